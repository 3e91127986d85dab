import Foundation

/// One byte input of a run (patchbay.h, pb_byte_input).
struct ByteInput: Sendable {
    var name: String
    var mediaType: String
    var bytes: [UInt8]
}

/// A normalized request as the host would send it, with its byte inputs.
struct RunRequest: Sendable {
    var json: String
    var inputs: [ByteInput] = []
}

/// The models, prompts and audio the clauses use.
///
/// For a plugin of the reference engine's `.ref` format the checker writes its own models when
/// none is given: one that streams multi-byte text quickly, and a copy with `prefill_ms` for
/// cancels during prompt processing. Other plugins get a long prompt (about 2,000 tokens) for
/// that, and transcription plugins 3 s and 30 s of synthesized speech-like audio.
struct Workload {
    /// The model to load; nil: none (model-dependent clauses are not applicable).
    let modelPath: String?
    /// A model whose prompt processing is long (the same model but for `.ref`).
    let prefillModelPath: String?
    /// Why there is no model.
    let noModelReason: String
    /// The reference engine's scripted format: its timing comes from the model file.
    let scripted: Bool
    private let loadFields: [String: Any]
    private let override: (kind: RequestKind, fields: [String: Any])?
    private let shortAudio: [UInt8]
    private let longAudio: [UInt8]

    enum Shape: String, Sendable {
        /// A short, ordinary request.
        case normal
        /// A generation that goes on for seconds unless cancelled.
        case long
        /// Asks for multi-byte characters.
        case utf8
        /// A long prompt (long audio): prompt processing takes a while.
        case longPrompt
        /// A prompt longer than the context window.
        case overContext
        /// A long generation with a 300 ms max_wall_ms.
        case timeLimit
    }

    /// Reads the options; writes models and audio into `directory` where the checker makes its own.
    init(options: CheckOptions, modelFormats: [String], directory: String) throws {
        let claimsRef = modelFormats.contains("ref")
        var modelPath = options.modelPath
        if modelPath == nil && claimsRef {
            modelPath = directory + "/check.ref"
            try Self.writeOnce(modelPath!, Self.referenceModel)
        }
        self.modelPath = modelPath
        noModelReason = modelPath == nil ? "no model: pass --model FILE (one this plugin loads)" : ""
        scripted = modelPath.map { $0.lowercased().hasSuffix(".ref") } ?? false
        if scripted, let modelPath {
            let prefill = directory + "/prefill.ref"
            let base = (try? String(contentsOfFile: modelPath, encoding: .utf8)) ?? ""
            try Self.writeOnce(prefill, base + "\nprefill_ms=4000\nprogress_interval_ms=100\nload_ms=0\n")
            prefillModelPath = prefill
        } else {
            prefillModelPath = modelPath
        }
        loadFields = try Self.object(options.loadFields, what: "--load-fields") ?? [:]
        if let fields = try Self.object(options.request, what: "--request") {
            let kind = (fields["kind"] as? String).flatMap(RequestKind.init(rawValue:)) ?? .chat
            override = (kind, fields)
        } else {
            override = nil
        }
        if let audio = options.audioPath {
            guard let data = FileManager.default.contents(atPath: audio) else { throw CheckError("cannot read --audio \(audio)") }
            shortAudio = [UInt8](data)
            longAudio = Self.repeated(shortAudio, seconds: 30) ?? Self.speechLikeWAV(seconds: 30)
        } else {
            shortAudio = Self.speechLikeWAV(seconds: 3)
            longAudio = Self.speechLikeWAV(seconds: 30)
        }
    }

    /// The model the checker writes for the reference engine: quick tokens, multi-byte text,
    /// a load slow enough to cancel, one engine thread for all runs (batching=1).
    static let referenceModel = """
        # Written by `patchbay plugin check` (see Tests/ScriptedPlugin/reference_plugin.c).
        reply=Conformance: naïve café, Grüße, 日本語のテキスト, Ελληνικά, emoji 🎉🚀 and plain words to stream.
        repeat=1
        token_delay_ms=2
        load_ms=200
        context_length=8192
        batching=1

        """

    func loadRequest(modelPath: String) -> String {
        var body = loadFields
        body["model_path"] = modelPath
        return Self.json(body)
    }

    private static let sentence = "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn. "

    /// A request of `kind` shaped as `shape`. `contextLength` sizes an over-long prompt.
    func request(_ kind: RequestKind, _ shape: Shape, contextLength: Int = 0, id: Int = 0) -> RunRequest {
        var body: [String: Any] = ["kind": kind.rawValue, "request_id": "conformance-\(id)"]
        var inputs: [ByteInput] = []
        func text(_ content: String) {
            if kind == .chat {
                body["messages"] = [["role": "user", "content": content]]
            } else {
                body["prompt"] = content
            }
        }
        switch kind {
        case .chat, .completion:
            switch shape {
            case .normal:
                text(kind == .chat ? "Write one short sentence about the sea." : "The capital of France is")
                body["max_tokens"] = 10
            case .long, .timeLimit:
                text(kind == .chat ? "Count from 1 to 1000, separated by commas." : "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
                body["max_tokens"] = 1024
                if shape == .timeLimit { body["max_wall_ms"] = 300 }
            case .utf8:
                text(kind == .chat ? "Repeat exactly: 日本語のテキスト, café, naïve, Ελληνικά, русский, 🎉🚀✨"
                                   : "Emoji and scripts: 🎉🚀✨ 日本語 Ελληνικά русский")
                body["max_tokens"] = 48
            case .longPrompt:
                text(String(repeating: Self.sentence, count: 140) + "\nSummarize the text above in one sentence.")
                body["max_tokens"] = 16
            case .overContext:
                text(String(repeating: "hello ", count: max(contextLength, 1) + 256))
                body["max_tokens"] = 16
            }
            body["temperature"] = 0
            body["seed"] = 1
        case .transcription:
            body["audio"] = ["input": "audio"]
            if shape == .timeLimit { body["max_wall_ms"] = 300 }
            let long = [.long, .longPrompt, .timeLimit].contains(shape)
            inputs = [ByteInput(name: "audio", mediaType: "audio/wav", bytes: long ? longAudio : shortAudio)]
        }
        if shape == .normal, let override, override.kind == kind {
            body = override.fields
            body["kind"] = kind.rawValue
            if kind != .transcription && body["max_tokens"] == nil { body["max_tokens"] = 16 }
        }
        return RunRequest(json: Self.json(body), inputs: inputs)
    }

    static func json(_ object: [String: Any]) -> String {
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        return String(decoding: data, as: UTF8.self)
    }

    private static func object(_ text: String?, what: String) throws -> [String: Any]? {
        guard let text else { return nil }
        guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
            throw CheckError("\(what) must be a JSON object")
        }
        return object
    }

    private static func writeOnce(_ path: String, _ text: String) throws {
        guard !FileManager.default.fileExists(atPath: path) else { return }
        try text.write(toFile: path + ".part", atomically: false, encoding: .utf8)
        _ = rename(path + ".part", path)
    }

    /// A WAV file's audio repeated until it lasts `seconds` (its fmt chunk kept), or nil when
    /// the file is not a WAV this can read.
    static func repeated(_ wav: [UInt8], seconds: Int) -> [UInt8]? {
        func u32(_ at: Int) -> Int { (0..<4).reduce(0) { $0 | Int(wav[at + $1]) << (8 * $1) } }
        guard wav.count >= 12, wav[0..<4].elementsEqual("RIFF".utf8), wav[8..<12].elementsEqual("WAVE".utf8) else { return nil }
        var fmt: ArraySlice<UInt8>?, data: ArraySlice<UInt8>?
        var at = 12
        while at + 8 <= wav.count {
            let size = u32(at + 4), body = at + 8
            let end = min(wav.count, body + size)
            if wav[at..<at + 4].elementsEqual("fmt ".utf8) { fmt = wav[body..<end] }
            if wav[at..<at + 4].elementsEqual("data".utf8) { data = wav[body..<end] }
            at = body + size + (size & 1)
        }
        guard let fmt, fmt.count >= 16, let data, !data.isEmpty else { return nil }
        let byteRate = fmt.dropFirst(8).prefix(4).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        guard byteRate > 0 else { return nil }
        var samples: [UInt8] = []
        while samples.count < byteRate * seconds { samples += data }
        func le32(_ value: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
        return Array("RIFF".utf8) + le32(4 + 8 + fmt.count + 8 + samples.count) + Array("WAVE".utf8)
            + Array("fmt ".utf8) + le32(fmt.count) + Array(fmt) + Array("data".utf8) + le32(samples.count) + samples
    }

    /// 16 kHz mono 16-bit PCM: voiced tones with a syllable-like envelope (four a second), so
    /// that a speech model has something to chew on.
    static func speechLikeWAV(seconds: Int) -> [UInt8] {
        let rate = 16_000
        let count = rate * seconds
        var samples = [UInt8]()
        samples.reserveCapacity(count * 2)
        var noise: UInt32 = 12345
        for index in 0..<count {
            let t = Double(index) / Double(rate)
            let syllable = max(0, sin(2 * .pi * 4 * t))
            let pitch = 140 + 30 * sin(2 * .pi * 0.5 * t)
            var value = 0.0
            for harmonic in 1...6 { value += sin(2 * .pi * pitch * Double(harmonic) * t) / Double(harmonic) }
            noise = noise &* 1_103_515_245 &+ 12345
            value = value * syllable * 0.25 + (Double(noise >> 16 & 0x7fff) / 32768 - 0.5) * 0.02
            let sample = Int16(max(-32767, min(32767, value * 32767)))
            samples.append(UInt8(truncatingIfNeeded: sample))
            samples.append(UInt8(truncatingIfNeeded: sample >> 8))
        }
        func le32(_ value: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
        func le16(_ value: Int) -> [UInt8] { (0..<2).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
        var wav = Array("RIFF".utf8) + le32(36 + samples.count) + Array("WAVE".utf8)
        wav += Array("fmt ".utf8) + le32(16) + le16(1) + le16(1) + le32(rate) + le32(rate * 2) + le16(2) + le16(16)
        wav += Array("data".utf8) + le32(samples.count) + samples
        return wav
    }
}

/// A problem with what the checker was asked to do (not a verdict about the plugin).
public struct CheckError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
