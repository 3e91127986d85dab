/// What `patchbay plugin check` was asked to do.
public struct CheckOptions: Sendable {
    /// The plugin library.
    public var pluginPath: String
    /// The model to load; nil: the checker writes one for a plugin of the reference
    /// engine's `.ref` format, and model-dependent clauses are not applicable otherwise.
    public var modelPath: String?
    /// A JSON object whose fields are added to every load request (e.g. {"n_threads": 2}).
    public var loadFields: String?
    /// A JSON object: the request of normal runs of its kind (default "chat").
    public var request: String?
    /// A WAV file for transcription runs; nil: the checker synthesizes one.
    public var audioPath: String?
    /// Multiplies every time limit (sanitizer builds and loaded machines are slower).
    public var timeScale: Double = 1
    /// Only these clauses (names, or bare names without the [kind] suffix); empty: all.
    public var only: [String] = []
    /// Libraries the worker processes preload (a sanitizer's runtime); empty: the checker
    /// preloads the sanitizer runtime the plugin was linked against, if any.
    public var preload: [String] = []
    /// Write the plugin's log lines and the checker's progress to standard error.
    public var verbose = false

    public init(pluginPath: String) {
        self.pluginPath = pluginPath
    }

    /// Whether `clause` was asked for.
    func wants(_ clause: String) -> Bool {
        guard !only.isEmpty else { return true }
        let base = clause.split(separator: "[").first.map(String.init) ?? clause
        return only.contains(clause) || only.contains(base)
    }
}
