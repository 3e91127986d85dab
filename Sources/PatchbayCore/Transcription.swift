import Foundation

/// One part of a `multipart/form-data` body, as the HTTP layer parsed it.
public struct FormPart: Sendable {
    public var name: String
    public var fileName: String?
    public var contentType: String?
    public var body: [UInt8]

    public init(name: String, fileName: String? = nil, contentType: String? = nil, body: [UInt8]) {
        self.name = name
        self.fileName = fileName
        self.contentType = contentType
        self.body = body
    }

    var text: String { String(decoding: body, as: UTF8.self) }
}

/// `POST /v1/audio/transcriptions`: OpenAI's form, validated.
public struct TranscriptionRequest: Sendable {
    public enum ResponseFormat: String, Sendable, CaseIterable {
        case json, text, srt, vtt
        case verboseJSON = "verbose_json"
    }

    public var model: String
    public var audio: ByteInput
    public var language: String?
    public var prompt: String?
    public var temperature: Double?
    public var responseFormat: ResponseFormat
    public var stream: Bool
    public var cancelID: String?
    public var sessionID: String?

    /// Reads the form. Every mistake is a 400 that names the field.
    public init(form: [FormPart]) throws(APIError) {
        func field(_ name: String) throws(APIError) -> String? {
            let parts = form.filter { $0.name == name }
            if parts.count > 1 { throw .invalidRequest("The form field '\(name)' is given more than once.", param: name) }
            return parts.first.map(\.text)
        }
        guard let file = form.first(where: { $0.name == "file" }) else {
            throw .invalidRequest("The form needs a 'file' field holding the audio.", param: "file", code: "missing_required_parameter")
        }
        if form.filter({ $0.name == "file" }).count > 1 { throw .invalidRequest("Send one 'file' per request.", param: "file") }
        guard file.fileName != nil else {
            throw .invalidRequest("'file' must be a file upload (a form part with a filename), not a text field.", param: "file")
        }
        if file.body.isEmpty { throw .invalidRequest("The audio file is empty.", param: "file", code: "invalid_audio") }
        guard let model = try field("model"), !model.isEmpty else {
            throw .invalidRequest("The form needs a 'model' field.", param: "model", code: "missing_required_parameter")
        }
        self.model = model
        audio = ByteInput(name: "audio", mediaType: Self.mediaType(of: file), bytes: file.body)

        if let language = try field("language")?.trimmingCharacters(in: .whitespaces).lowercased(), !language.isEmpty {
            guard Self.languageNames[language] != nil else {
                throw .invalidRequest("'language' must be an ISO 639-1 code Whisper knows (en, de, fr, …); got '\(language)'.",
                                      param: "language")
            }
            self.language = language
        }
        prompt = try field("prompt")
        if let text = try field("temperature") {
            guard let value = Double(text.trimmingCharacters(in: .whitespaces)), value >= 0, value <= 1 else {
                throw .invalidRequest("'temperature' must be a number between 0 and 1.", param: "temperature")
            }
            temperature = value
        }
        let formatName = try field("response_format") ?? "json"
        guard let format = ResponseFormat(rawValue: formatName) else {
            throw .invalidRequest("'response_format' must be one of json, text, srt, vtt, verbose_json; got '\(formatName)'.",
                                  param: "response_format")
        }
        responseFormat = format
        switch try field("stream")?.lowercased() {
        case nil, "false", "0": stream = false
        case "true", "1": stream = true
        case let other?: throw .invalidRequest("'stream' must be true or false; got '\(other)'.", param: "stream")
        }
        if stream && ![.json, .text].contains(format) {
            throw .invalidRequest("Streaming gives text deltas; use response_format json or text with stream=true.",
                                  param: "response_format")
        }
        for name in ["timestamp_granularities[]", "timestamp_granularities"] {
            for part in form where part.name == name && part.text != "segment" {
                throw .invalidRequest("Only segment timestamps are available (got '\(part.text)').", param: name)
            }
        }
        cancelID = try field("cancel_id")
        sessionID = try field("session_id")
    }

    /// The file part's media type, from its Content-Type or its name's extension.
    static func mediaType(of file: FormPart) -> String {
        if let type = file.contentType?.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased(),
           !type.isEmpty, type != "application/octet-stream" {
            return type
        }
        let ext = (file.fileName ?? "").split(separator: ".").last.map(String.init) ?? ""
        return audioMediaType(forExtension: ext) ?? "application/octet-stream"
    }

    /// The media type of an audio file name extension or `input_audio` format ("wav", "mp3").
    public static func audioMediaType(forExtension ext: String) -> String? {
        ["wav": "audio/wav", "wave": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
         "m4a": "audio/mp4", "mp4": "audio/mp4", "webm": "audio/webm"][ext.lowercased()]
    }

    public func normalized(maxWallMilliseconds: Int) -> NormalizedRequest {
        var request = NormalizedRequest.transcription(of: audio, temperature: temperature, maxWallMilliseconds: maxWallMilliseconds)
        request.language = language
        request.prompt = prompt
        return request
    }

    /// Whisper's languages, by ISO 639-1 code (verbose_json names the language in full, as OpenAI does).
    public static let languageNames: [String: String] = Dictionary(uniqueKeysWithValues: """
        en english,zh chinese,de german,es spanish,ru russian,ko korean,fr french,ja japanese,pt portuguese,tr turkish,\
        pl polish,ca catalan,nl dutch,ar arabic,sv swedish,it italian,id indonesian,hi hindi,fi finnish,vi vietnamese,\
        he hebrew,uk ukrainian,el greek,ms malay,cs czech,ro romanian,da danish,hu hungarian,ta tamil,no norwegian,\
        th thai,ur urdu,hr croatian,bg bulgarian,lt lithuanian,la latin,mi maori,ml malayalam,cy welsh,sk slovak,\
        te telugu,fa persian,lv latvian,bn bengali,sr serbian,az azerbaijani,sl slovenian,kn kannada,et estonian,\
        mk macedonian,br breton,eu basque,is icelandic,hy armenian,ne nepali,mn mongolian,bs bosnian,kk kazakh,\
        sq albanian,sw swahili,gl galician,mr marathi,pa punjabi,si sinhala,km khmer,sn shona,yo yoruba,so somali,\
        af afrikaans,oc occitan,ka georgian,be belarusian,tg tajik,sd sindhi,gu gujarati,am amharic,yi yiddish,lo lao,\
        uz uzbek,fo faroese,ht haitian creole,ps pashto,tk turkmen,nn nynorsk,mt maltese,sa sanskrit,lb luxembourgish,\
        my myanmar,bo tibetan,tl tagalog,mg malagasy,as assamese,tt tatar,haw hawaiian,ln lingala,ha hausa,ba bashkir,\
        jw javanese,su sundanese,yue cantonese
        """.split(separator: ",").map { entry in
            let pair = entry.split(separator: " ", maxSplits: 1)
            return (String(pair[0]), String(pair[1]))
        })
}

/// A whole transcription, gathered from a run's events, in each of OpenAI's response formats.
public struct TranscriptionResult: Sendable {
    public private(set) var segments: [TranscriptSegment] = []
    public private(set) var language: String?
    public private(set) var usage: Usage?
    public private(set) var error: APIError?

    public init() {}

    public mutating func add(_ event: GenerationEvent) {
        switch event {
        case .segment(let segment): segments.append(segment)
        case .language(let code, _): language = code
        case .usage(let usage): self.usage = usage
        case .error(let error): self.error = APIError(error)
        default: break
        }
    }

    /// The segments joined; Whisper starts each with the space that separates it.
    public var text: String {
        segments.map(\.text).joined().trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The body and its content type.
    public func response(format: TranscriptionRequest.ResponseFormat) -> (bytes: [UInt8], contentType: String) {
        switch format {
        case .json:
            var json = JSONWriter()
            json.raw("{\"text\":")
            json.string(text)
            if let usage { writeUsage(usage, into: &json) }
            json.raw("}")
            return (json.bytes, "application/json")
        case .verboseJSON:
            return (verboseJSON, "application/json")
        case .text:
            return (Array((text + "\n").utf8), "text/plain; charset=utf-8")
        case .srt:
            var out = ""
            for (index, segment) in segments.enumerated() {
                out += "\(index + 1)\n\(Self.timestamp(segment.startMilliseconds, separator: ","))"
                out += " --> \(Self.timestamp(segment.endMilliseconds, separator: ","))\n"
                out += segment.text.trimmingCharacters(in: .whitespaces) + "\n\n"
            }
            return (Array(out.utf8), "application/x-subrip; charset=utf-8")
        case .vtt:
            var out = "WEBVTT\n\n"
            for segment in segments {
                out += "\(Self.timestamp(segment.startMilliseconds, separator: ".")) --> "
                out += "\(Self.timestamp(segment.endMilliseconds, separator: "."))\n"
                out += segment.text.trimmingCharacters(in: .whitespaces) + "\n\n"
            }
            return (Array(out.utf8), "text/vtt; charset=utf-8")
        }
    }

    private var verboseJSON: [UInt8] {
        var json = JSONWriter()
        json.raw("{\"task\":\"transcribe\",\"language\":")
        json.string(language.map { TranscriptionRequest.languageNames[$0] ?? $0 } ?? "unknown")
        json.raw(",\"duration\":")
        json.double(Double(segments.last?.endMilliseconds ?? 0) / 1000)
        json.raw(",\"text\":")
        json.string(text)
        json.raw(",\"segments\":[")
        for (index, segment) in segments.enumerated() {
            if index > 0 { json.raw(",") }
            json.raw("{\"id\":")
            json.int(index)
            json.raw(",\"seek\":0,\"start\":")
            json.double(Double(segment.startMilliseconds) / 1000)
            json.raw(",\"end\":")
            json.double(Double(segment.endMilliseconds) / 1000)
            json.raw(",\"text\":")
            json.string(segment.text)
            // Whisper's per-segment statistics are not reported by the engine; OpenAI's
            // schema has them, so they are present with neutral values.
            json.raw(",\"tokens\":[],\"temperature\":0.0,\"avg_logprob\":0.0,\"compression_ratio\":0.0,\"no_speech_prob\":0.0}")
        }
        json.raw("]")
        if let usage { writeUsage(usage, into: &json) }
        json.raw("}")
        return json.bytes
    }

    /// `00:01:02,345` (SRT) or `00:01:02.345` (WebVTT).
    static func timestamp(_ milliseconds: Int, separator: String) -> String {
        let ms = max(0, milliseconds)
        let hours = ms / 3_600_000, minutes = ms / 60_000 % 60, seconds = ms / 1000 % 60
        return String(format: "%02d:%02d:%02d%@%03d", hours, minutes, seconds, separator, ms % 1000)
    }
}

/// OpenAI's token usage for transcriptions (`input_tokens` is the audio, which Whisper does not count).
private func writeUsage(_ usage: Usage, into json: inout JSONWriter) {
    json.raw(",\"usage\":{\"type\":\"tokens\",\"input_tokens\":")
    json.int(usage.promptTokens)
    json.raw(",\"output_tokens\":")
    json.int(usage.completionTokens)
    json.raw(",\"total_tokens\":")
    json.int(usage.promptTokens + usage.completionTokens)
    json.raw("}")
}

/// A streamed transcription: OpenAI's `transcript.text.delta` per segment, then
/// `transcript.text.done` with the whole text. An engine error after the 200 goes in-band.
public struct TranscriptionStreamEncoder: EventStreamEncoder {
    private var result = TranscriptionResult()
    private var sentText = false

    public init() {}

    public mutating func encode(_ event: GenerationEvent, into out: inout [UInt8]) {
        result.add(event)
        switch event {
        case .segment(let segment):
            // The first delta loses the leading space, so that the deltas add up to `text`.
            let delta = sentText ? segment.text : String(segment.text.drop { $0.isWhitespace })
            guard !delta.isEmpty else { return }
            sentText = true
            var json = JSONWriter()
            json.raw("{\"type\":\"transcript.text.delta\",\"delta\":")
            json.string(delta)
            json.raw("}")
            SSE.data(json.bytes, into: &out)
        case .finish:
            var json = JSONWriter()
            json.raw("{\"type\":\"transcript.text.done\",\"text\":")
            json.string(result.text)
            if let usage = result.usage { writeUsage(usage, into: &json) }
            json.raw("}")
            SSE.data(json.bytes, into: &out)
        case .error(let error):
            encode(error: APIError(error), into: &out)
        default: break
        }
    }

    public func encode(error: APIError, into out: inout [UInt8]) {
        SSE.openAIError(error, into: &out)
    }
}

extension NormalizedRequest {
    /// A transcription of `audio`, from the audio route or a chat with a speech-to-text model.
    public static func transcription(of audio: ByteInput, temperature: Double?, maxWallMilliseconds: Int) -> NormalizedRequest {
        var request = NormalizedRequest(kind: .transcription, maxTokens: maxTokensLimit, maxWallMilliseconds: maxWallMilliseconds)
        request.inputs = [audio]
        request.audioInput = audio.name
        request.sampling.temperature = temperature
        return request
    }
}
