import Foundation
import Synchronization

/// The worker's line to the checker: JSON messages on a descriptor of their own (the
/// worker's standard output at start; the plugin's own writes to standard output go to
/// standard error instead).
final class WorkerOutput: Sendable {
    let descriptor: Int32
    private let lock = Mutex(())

    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    func send(_ message: WorkerMessage) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        guard var data = try? encoder.encode(message) else { return }
        data.append(0x0a)
        lock.withLock { _ in
            data.withUnsafeBytes { bytes in
                var offset = 0
                while offset < bytes.count {
                    let written = write(descriptor, bytes.baseAddress! + offset, bytes.count - offset)
                    if written <= 0 {
                        if written < 0 && errno == EINTR { continue }
                        return
                    }
                    offset += written
                }
            }
        }
    }
}
