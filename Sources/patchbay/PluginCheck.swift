import ArgumentParser
import Foundation
import PatchbayConformance

/// `patchbay plugin …`: tools for backend plugins.
struct PluginCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugin",
        abstract: "Tools for backend plugins.",
        subcommands: [Check.self])
}

extension PluginCommand {
    /// `patchbay plugin check PATH`: the conformance checker.
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a plugin library through the whole ABI contract (patchbay.h), without the HTTP server.",
            discussion: """
                Prints one line per clause, PASS, FAIL or N/A with the reason, then a summary; exits 0 only when \
                no clause failed. The plugin runs in worker processes, so a crash, a guard-page fault, a \
                sanitizer report or a hang fails the clause it happened in and the check goes on. A library \
                linked against a sanitizer runtime (-fsanitize=address or thread) gets that runtime preloaded \
                into the workers (see README, "Checking a plugin").
                """)

        @Argument(help: "The plugin library (.so).") var path: String?
        @Option(help: ArgumentHelp(
            "The model to load.",
            discussion: "Without it, a plugin of the reference engine's .ref format gets a model the checker writes; for others the clauses that need a model are not applicable."))
        var model: String?
        @Option(help: "A JSON object of fields added to every load request, e.g. '{\"n_threads\": 2}'.") var loadFields: String?
        @Option(help: "A JSON object: the request body of normal runs of its kind (default chat), instead of the checker's.") var request: String?
        @Option(help: "A WAV file for transcription runs (default: synthesized speech-like audio).") var audio: String?
        @Option(help: "Multiply every time limit by this (sanitizer builds, slow machines).") var timeScale: Double = 1
        @Option(help: "Run only these clauses (comma-separated names, with or without their [kind]).") var only: [String] = []
        @Option(help: "Preload these libraries into the workers (default: the sanitizer runtime the plugin needs, if any).") var preload: [String] = []
        @Flag(help: "Print the verdicts as JSON.") var json = false
        @Flag(help: "Show the plugin's log lines and the workers' progress on standard error.") var verbose = false
        @Flag(help: "List the clauses and what each checks, and exit.") var listClauses = false

        @Option(help: .hidden) var workerGroup: String?
        @Option(help: .hidden) var workerDir: String?
        @Option(help: .hidden) var workerSkip: String?

        func validate() throws {
            guard timeScale > 0 else { throw ValidationError("--time-scale must be positive") }
            guard path != nil || listClauses else { throw ValidationError("Missing expected argument '<path>'") }
        }

        func run() throws {
            if listClauses {
                let width = Checker.clauseDescriptions.map(\.clause.count).max() ?? 0
                let lines = Checker.clauseDescriptions.map { $0.clause.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + $0.checks }
                FileHandle.standardOutput.write(Data((lines.joined(separator: "\n") + "\n").utf8))
                return
            }
            guard let path else { return }
            var options = CheckOptions(pluginPath: URL(fileURLWithPath: path).standardizedFileURL.path)
            options.modelPath = model.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            options.loadFields = loadFields
            options.request = request
            options.audioPath = audio
            options.timeScale = timeScale
            options.only = only.flatMap { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }.filter { !$0.isEmpty }
            options.preload = preload.flatMap { $0.split(separator: ":").map(String.init) }
            options.verbose = verbose
            if let workerGroup {
                guard let group = Worker.Group(rawValue: workerGroup), let workerDir else { throw ValidationError("bad worker options") }
                let skip = (workerSkip ?? "").split(separator: ",").map(String.init)
                Worker.run(options: options, group: group, skip: skip, directory: workerDir)
            }
            let report: Checker.Report
            do {
                report = try Checker(options: options).run()
            } catch let error as CheckError {
                throw ValidationError(error.description)
            }
            FileHandle.standardOutput.write(Data((json ? report.json : report.text).utf8))
            if report.failed > 0 { throw ExitCode(1) }
        }
    }
}
