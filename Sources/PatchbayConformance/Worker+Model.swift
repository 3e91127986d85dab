import CPatchbayABI
import Foundation

/// The clauses about models: load, load-cancel, model-info, and error buffers.
extension Worker {
    func loadClause() -> ClauseResult {
        let clause = "load"
        guard context.workload.modelPath != nil else { return .na(clause, context.workload.noModelReason) }
        guard let outcome = context.loadMainModel() else {
            return context.loadedMainModel != nil ? .pass(clause, "loaded before") : .fail(clause, "the model did not load")
        }
        guard let status = outcome.status else { return .fail(clause, "load did not return within \(Int(context.seconds(600))) s") }
        guard status == Int32(PB_OK) else { return .fail(clause, "load failed with status \(status): \(outcome.message)") }
        guard outcome.model != nil else { return .fail(clause, "load returned PB_OK without a model") }
        var problems = progressProblems(outcome.progress, returnedAt: outcome.progress.returnedAt ?? nowMilliseconds())
        let calls = outcome.progress.calls
        if calls.isEmpty { problems.append("no progress was reported (pb_load_callbacks.progress was never called)") }
        let phases = calls.map(\.phase).reduce(into: [String]()) { if $0.last != $1 { $0.append($1) } }
        let silence = longestSilence(outcome.progress, returnedAt: outcome.progress.returnedAt ?? 0)
        let detail = "loaded in \(formatMilliseconds(outcome.milliseconds)); \(calls.count) progress calls (phases \(phases.prefix(8).joined(separator: " → "))), "
            + "longest silence \(formatMilliseconds(silence))"
            + (silence > 1000 ? " (note: patchbay.h asks for progress at least every 100 ms, so that a cancel is noticed quickly)" : "")
        return problems.isEmpty ? .pass(clause, detail) : .fail(clause, problems.joined(separator: "; ") + " — \(detail)")
    }

    /// The longest time without a progress call during a load.
    func longestSilence(_ progress: LoadProgressRecorder, returnedAt: Double) -> Double {
        let times = [progress.started] + progress.calls.map(\.at).filter { $0 <= returnedAt } + [returnedAt]
        return zip(times, times.dropFirst()).map { $1 - $0 }.max() ?? 0
    }

    /// What is wrong with the progress a load reported.
    func progressProblems(_ progress: LoadProgressRecorder, returnedAt: Double) -> [String] {
        var problems: [String] = []
        if let bad = progress.calls.first(where: { $0.phase.isEmpty || $0.phase == "(NULL)" || $0.phase.count > 64 }) {
            problems.append("progress phase '\(bad.phase)' is not a short word")
        }
        if let bad = progress.calls.first(where: { $0.total > 0 && $0.loaded > $0.total }) {
            problems.append("progress says \(bad.loaded) of \(bad.total) bytes")
        }
        if progress.lateCalls > 0 { problems.append("progress was called \(progress.lateCalls) times after load returned") }
        // patchbay.h: a plugin *should* report at least every 100 ms; a load silent for 10 s
        // leaves a cancel waiting that long, which fails.
        let silence = longestSilence(progress, returnedAt: returnedAt)
        if silence > 10_000 * context.options.timeScale {
            problems.append("\(formatMilliseconds(silence)) passed without a progress call: a cancel waits that long (report at least every 100 ms)")
        }
        return problems
    }

    func loadCancel() -> ClauseResult {
        let clause = "load-cancel"
        guard let path = context.workload.modelPath else { return .na(clause, context.workload.noModelReason) }
        _ = context.model()
        // Two cancelled loads. What the first leaves may be state the plugin makes once (a log
        // thread started by its first error); what the second adds is a leak. No child process
        // may outlive either.
        let start = ProcessCensus.take()
        func cancelledLoad() -> LoadOutcome {
            var midway = 0
            return context.load(path: path) { call, _ in
                let isMidway = call.phase != "ready" && (call.total == 0 || call.loaded < call.total)
                if isMidway { midway += 1 }
                return !isMidway || midway >= 2
            }
        }
        let first = cancelledLoad()
        if let model = first.model { _ = context.unload(model) }
        let before = ProcessCensus.take()
        let outcome = first.status == nil ? first : cancelledLoad()
        guard let status = outcome.status else { return .fail(clause, "load did not return within \(Int(context.seconds(600))) s of being cancelled") }
        let calls = outcome.progress.calls
        guard let cancelledAt = outcome.progress.cancelledAt, let returnedAt = outcome.progress.returnedAt else {
            if let model = outcome.model { _ = context.unload(model) }
            return .fail(clause, "load reported no progress, so it could not be cancelled")
        }
        let index = calls.firstIndex { $0.at >= cancelledAt } ?? 0
        let at = calls[index]
        let when = "at progress call \(index + 1) (\(at.phase), \(at.loaded) of \(at.total) bytes)"
        var problems: [String] = []
        if status == Int32(PB_OK) {
            problems.append("load returned PB_OK though cancelled \(when)")
            if let model = outcome.model { _ = context.unload(model) }
        } else if status != Int32(PB_ERR_CANCELLED) {
            problems.append("load returned status \(status), not PB_ERR_CANCELLED (\(outcome.message))")
        }
        let stopped = returnedAt - cancelledAt
        if stopped > context.cancelToEndLimitMilliseconds { problems.append("load took \(formatMilliseconds(stopped)) to stop after the cancel") }
        if outcome.progress.lateCalls > 0 { problems.append("progress was called \(outcome.progress.lateCalls) times after load returned") }
        let left = before.leftovers(after: context.seconds(3))
        if !left.isEmpty { problems.append("a second cancelled load left " + left.joined(separator: "; ")) }
        let children = start.leftovers(after: 0).filter { $0.contains("child process") }
        if !children.isEmpty && left.isEmpty { problems.append("the cancelled loads left " + children.joined(separator: "; ")) }
        let detail = "cancelled \(when); load returned in \(formatMilliseconds(stopped)) with status \(status)"
        return .judged(clause, problems: problems, detail: detail)
    }

    func modelInfo() -> ClauseResult {
        let clause = "model-info"
        let model: CheckModel
        switch requireModel(clause) {
        case .success(let loaded): model = loaded
        case .failure(let result): return result
        }
        let fullSize = MemoryLayout<pb_model_info>.size
        let size10 = MemoryLayout<pb_model_info>.offset(of: \pb_model_info.capabilities)! + MemoryLayout<UInt64>.size
        let sizeMid = MemoryLayout<pb_model_info>.offset(of: \pb_model_info.parallel_slots)! + MemoryLayout<Int32>.size
        var problems: [String] = []
        var full = pb_model_info()
        let table = context.table
        for declared in [fullSize, sizeMid, size10] {
            // Zeroed within the declared size, sentinel bytes after it: a write past the size shows.
            let memory = UnsafeMutableRawPointer.allocate(byteCount: fullSize + 64, alignment: 8)
            defer { memory.deallocate() }
            memory.initializeMemory(as: UInt8.self, repeating: 0xA5, count: fullSize + 64)
            memory.initializeMemory(as: UInt8.self, repeating: 0, count: declared)
            memory.storeBytes(of: UInt32(declared), as: UInt32.self)
            let info = memory.assumingMemoryBound(to: pb_model_info.self)
            context.time("model_info") { table.model_info(model.handle, info) }
            if memory.load(as: UInt32.self) != UInt32(declared) { problems.append("model_info changed struct_size (\(declared))") }
            if let at = (declared..<(fullSize + 64)).first(where: { memory.load(fromByteOffset: $0, as: UInt8.self) != 0xA5 }) {
                problems.append("with struct_size \(declared), model_info wrote byte \(at) (\(Self.infoField(at: at))), past the size the host declared")
            }
            if declared == fullSize { full = info.pointee }
        }
        if full.context_length < 0 { problems.append("context_length \(full.context_length)") }
        if full.parallel_slots < 0 || full.parallel_slots > 4096 { problems.append("parallel_slots \(full.parallel_slots)") }
        if full.embedding_dimensions < 0 || full.training_context_length < 0 || full.parameter_count < 0 {
            problems.append("negative counts (embedding_dimensions \(full.embedding_dimensions), training_context_length \(full.training_context_length), parameter_count \(full.parameter_count))")
        }
        var architecture = "none"
        if let pointer = full.architecture {
            let bytes = Array(UnsafeRawBufferPointer(start: pointer, count: strnlen(pointer, 257)))
            if bytes.count > 256 || UTF8Check(bytes).problem != nil { problems.append("architecture is not a short UTF-8 string") }
            architecture = String(decoding: bytes, as: UTF8.self)
        }
        var notes: [String] = []
        let widened = full.capabilities & ~context.table.capabilities
        if widened != 0 { notes.append(String(format: "claims capabilities 0x%llx its plugin does not (the host ignores them)", widened)) }
        // [any-thread]: the same answer from several threads at once.
        let answers = SharedList<String>()
        let threads = (0..<4).map { _ in
            CheckThread("pbcheck-info") { [context] in
                for _ in 0..<10 {
                    var info = pb_model_info()
                    info.struct_size = UInt32(fullSize)
                    context!.time("model_info") { table.model_info(model.handle, &info) }
                    answers.append(Self.describe(info))  // fields, not bytes: padding may hold anything
                }
            }
        }
        for thread in threads where !thread.wait(seconds: context.seconds(30)) {
            context.poison("model_info did not return")
            return .fail(clause, "model_info from several threads at once did not return within \(Int(context.seconds(30))) s")
        }
        let distinct = Set(answers.all + [Self.describe(full)])
        if distinct.count > 1 { problems.append("model_info answers differ when asked from several threads at once: \(distinct.sorted().prefix(3).joined(separator: " / "))") }
        let detail = "context \(full.context_length), slots \(full.parallel_slots), training context \(full.training_context_length), "
            + "\(full.parameter_count) parameters, \(full.size_bytes) bytes, architecture \(architecture); writes stay inside struct_size \(size10), \(sizeMid) and \(fullSize)"
            + (notes.isEmpty ? "" : "; note: \(notes.joined(separator: "; "))")
        return .judged(clause, problems: problems, detail: detail)
    }

    /// A model_info answer's values (the architecture by its text: the pointer may differ).
    static func describe(_ info: pb_model_info) -> String {
        "\(info.context_length) \(info.capabilities) \(info.parallel_slots) \(info.embedding_dimensions) \(info.training_context_length) "
            + "\(info.parameter_count) \(info.size_bytes) \(info.architecture.map { String(cString: $0) } ?? "NULL")"
    }

    /// The pb_model_info field at a byte offset, for a message.
    static func infoField(at offset: Int) -> String {
        let fields: [(String, Int)] = [
            ("context_length", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.context_length)!),
            ("capabilities", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.capabilities)!),
            ("parallel_slots", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.parallel_slots)!),
            ("embedding_dimensions", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.embedding_dimensions)!),
            ("training_context_length", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.training_context_length)!),
            ("parameter_count", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.parameter_count)!),
            ("size_bytes", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.size_bytes)!),
            ("architecture", MemoryLayout<pb_model_info>.offset(of: \pb_model_info.architecture)!),
        ]
        if offset >= MemoryLayout<pb_model_info>.size { return "past the whole 1.\(PB_ABI_VERSION_MINOR) struct" }
        return fields.last { $0.1 <= offset }?.0 ?? "?"
    }

    func errorBuffers() -> ClauseResult {
        let clause = "error-buffers"
        let table = context.table
        var problems: [String] = []
        var checked: [String] = []
        let sizes = [1024, 8, 1]
        let formats = (table.model_formats.map { String(cString: $0) } ?? "").split(separator: ",")
            .map { $0.trimmingCharacters(in: .whitespaces) }
        let missing = "/nonexistent-patchbay-check/model.\(formats.first ?? "bin")"

        /// Judges one call that was expected to fail, at every buffer size.
        func check(_ what: String, expectFailure: Bool, _ call: (UnsafeMutablePointer<CChar>, Int) -> (pb_status?, () -> Void)) {
            for size in sizes {
                let buffer = SentinelBuffer(size: size)
                let (status, cleanUp) = call(buffer.pointer, size)
                guard let status else {
                    problems.append("\(what) did not return")
                    return
                }
                if status == Int32(PB_OK) {
                    cleanUp()
                    if expectFailure && size == sizes[0] { problems.append("\(what) returned PB_OK") }
                    if size == sizes[0] { checked.append("\(what): accepted") }
                    continue
                }
                let known = status >= Int32(PB_ERR_INVALID_REQUEST) && status <= Int32(PB_ERR_TIMED_OUT)
                if !known && size == sizes[0] { problems.append("\(what) returned status \(status), which is no pb_status") }
                if let problem = buffer.problem(required: size > 1) {
                    problems.append("\(what), error_size \(size): \(problem)")
                } else if size == sizes[0] {
                    checked.append("\(what): \(status) '\(buffer.text.prefix(60))'")
                }
            }
        }
        func load(_ request: String, _ error: UnsafeMutablePointer<CChar>, _ size: Int) -> (pb_status?, () -> Void) {
            let box = Box<(pb_status, OpaquePointer?)>((0, nil))
            let thread = CheckThread("pbcheck-load") {
                var handle: OpaquePointer?
                let status = table.load(request, nil, &handle, error, size)
                box.value = (status, handle)
            }
            guard thread.wait(seconds: context.seconds(120)) else {
                context.poison("load of a missing file did not return")
                return (nil, {})
            }
            let (status, handle) = box.value
            return (status, { [context] in
                if let handle { _ = context!.unload(CheckModel(handle: handle, path: "", context: context!)) }
            })
        }
        check("load of a missing file", expectFailure: true) { load(context.workload.loadRequest(modelPath: missing), $0, $1) }
        check("load of a request that is not JSON", expectFailure: false) { load("{not json", $0, $1) }

        if case .success(let model) = context.model() {
            for kind in library!.kinds {
                func create(_ json: String, _ inputs: [ByteInput], _ error: UnsafeMutablePointer<CChar>, _ size: Int) -> (pb_status?, () -> Void) {
                    var handle: OpaquePointer?
                    let status: pb_status
                    if let withInputs = table.run_create_with_inputs {
                        var structs = inputs.map { input -> pb_byte_input in
                            pb_byte_input(struct_size: UInt32(MemoryLayout<pb_byte_input>.size), name: strdup(input.name),
                                          media_type: strdup(input.mediaType), data: UnsafePointer(GuardedMemory.bytes(input.bytes, guarded: false, label: "")),
                                          size: input.bytes.count)
                        }
                        status = structs.withUnsafeMutableBufferPointer { buffer in
                            var pointers = (0..<buffer.count).map { UnsafePointer(buffer.baseAddress! + $0) as UnsafePointer<pb_byte_input>? }
                            return context.time("run_create") { withInputs(model.handle, json, &pointers, pointers.count, &handle, error, size) }
                        }
                    } else {
                        status = context.time("run_create") { table.run_create(model.handle, json, &handle, error, size) }
                    }
                    return (status, { if let handle { table.run_destroy(handle) } })
                }
                if kind == library!.kinds.first {
                    check("run_create of a request that is not JSON", expectFailure: false) { create("{", [], $0, $1) }
                }
                if kind == .transcription {
                    let request = context.workload.request(.transcription, .normal)
                    let notWAV = [ByteInput(name: "audio", mediaType: "audio/wav", bytes: Array("this is not a WAV file".utf8))]
                    check("run_create of a transcription of bytes that are not audio", expectFailure: true) { create(request.json, notWAV, $0, $1) }
                    let json = request.json.replacingOccurrences(of: "\"input\":\"audio\"", with: "\"input\":\"missing\"")
                    check("run_create of a transcription naming a byte input that is not there", expectFailure: true) { create(json, request.inputs, $0, $1) }
                }
            }
            if let countTokens = table.count_tokens, table.capabilities & UInt64(PB_CAP_TOKENIZE) != 0 {
                check("count_tokens of a request that is not JSON", expectFailure: false) { error, size in
                    var count: Int64 = 0
                    return (countTokens(model.handle, "{", &count, error, size), {})
                }
            }
            if let embed = table.embed, table.capabilities & UInt64(PB_CAP_EMBEDDINGS) != 0 {
                check("embed into a buffer of 0 floats", expectFailure: true) { error, size in
                    var dimensions = 0
                    var room: Float = 0
                    let status = embed(model.handle, "hello", 5, &room, 0, &dimensions, error, size)
                    if status == Int32(PB_ERR_INVALID_REQUEST) && dimensions == 0 && size == sizes[0] {
                        problems.append("embed with too little room did not say how many dimensions it needs")
                    }
                    return (status, {})
                }
            }
        }
        let detail = "\(checked.count) failing calls at error_size \(sizes.map(String.init).joined(separator: ", ")): " + checked.joined(separator: "; ")
        return problems.isEmpty ? .pass(clause, detail)
                                : .fail(clause, problems.prefix(4).joined(separator: "; ") + (problems.count > 4 ? "; … (\(problems.count) in all)" : ""))
    }
}
