// model_file.cpp — whisper.cpp's model file: its header, and a loader with progress and cancel.
//
// The file is legacy ggml (not GGUF): the magic 0x67676d6c, eleven int32 hyper-parameters,
// the mel filter bank (n_mel, n_fft, floats), the vocabulary (n_vocab, then length + bytes
// per token), then tensor records (n_dims, name length, type, dims, name, data) to the end.
#include "whisper_plugin.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace {

constexpr uint32_t ggml_magic = 0x67676d6c;  // "ggml" as a little-endian uint32 ("lmgg" on disk)

struct file_closer {
    FILE *file;
    ~file_closer() {
        if (file) fclose(file);
    }
};

bool read_i32(FILE *file, int32_t &out) { return fread(&out, 4, 1, file) == 1; }

// Hyper-parameters that a Whisper model has (every released size, and fine-tunes of them),
// so that another legacy-ggml model (old llama.cpp files share the magic) is not claimed.
bool plausible(const whisper_file_header &h, std::string &why) {
    auto in = [](int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
    if (h.n_mels != 80 && h.n_mels != 128) {
        why = "legacy ggml, but not a Whisper model (no 80 or 128 mel bands)";
        return false;
    }
    if (!in(h.n_vocab, 1000, 1 << 20) || !in(h.n_audio_ctx, 1, 1 << 16) || !in(h.n_text_ctx, 1, 1 << 16) ||
        !in(h.n_audio_state, 64, 1 << 14) || h.n_text_state != h.n_audio_state || !in(h.n_audio_head, 1, 256) ||
        !in(h.n_text_head, 1, 256) || h.n_audio_state % h.n_audio_head != 0 || h.n_text_state % h.n_text_head != 0 ||
        !in(h.n_audio_layer, 1, 256) || !in(h.n_text_layer, 1, 256) || !in(h.ftype % 1000, 0, 63)) {
        why = "legacy ggml, but its hyper-parameters are not a Whisper model's";
        return false;
    }
    return true;
}

}  // namespace

const char *whisper_file_header::size_name() const {
    switch (n_audio_layer) {
    case 4: return "tiny";
    case 6: return "base";
    case 12: return "small";
    case 24: return "medium";
    case 32: return n_text_layer <= 4 ? "large-v3-turbo" : "large";
    default: return "custom";
    }
}

bool read_whisper_header(const std::string &path, whisper_file_header &h, std::string &why) {
    file_closer f{fopen(path.c_str(), "rb")};
    if (!f.file) {
        why = "cannot open the file";
        return false;
    }
    uint32_t magic = 0;
    if (fread(&magic, 4, 1, f.file) != 1) {
        why = "the file is too short";
        return false;
    }
    if (memcmp(&magic, "GGUF", 4) == 0) {
        why = "GGUF, not a whisper.cpp ggml model";
        return false;
    }
    if (magic != ggml_magic) {
        why = "not a ggml file";
        return false;
    }
    int32_t *fields[] = {&h.n_vocab, &h.n_audio_ctx, &h.n_audio_state, &h.n_audio_head, &h.n_audio_layer, &h.n_text_ctx,
                         &h.n_text_state, &h.n_text_head, &h.n_text_layer, &h.n_mels, &h.ftype};
    for (int32_t *field : fields)
        if (!read_i32(f.file, *field)) {
            why = "legacy ggml, but the header is truncated";
            return false;
        }
    if (!plausible(h, why)) return false;
    // The mel filter bank follows: its shape must agree (n_fft is 201 for Whisper's 400-point FFT).
    int32_t n_mel = 0, n_fft = 0;
    if (!read_i32(f.file, n_mel) || !read_i32(f.file, n_fft) || n_mel != h.n_mels || n_fft != 1 + WHISPER_N_FFT / 2) {
        why = "legacy ggml, but without a Whisper mel filter bank";
        return false;
    }
    if (fseeko(f.file, 0, SEEK_END) == 0) h.file_size = (uint64_t)ftello(f.file);
    return true;
}

bool read_model_layout(const std::string &path, whisper_file_header &h, std::string &why) {
    file_closer f{fopen(path.c_str(), "rb")};
    if (!f.file) {
        why = "cannot open the file";
        return false;
    }
    why = "the model file is truncated or damaged";
    const uint64_t size = h.file_size;
    uint64_t pos = 4 + 11 * 4 + 8;  // the filter bank (its shape was checked by read_whisper_header)
    h.mel_filters.resize((size_t)h.n_mels * (1 + WHISPER_N_FFT / 2));
    if (fseeko(f.file, (off_t)pos, SEEK_SET) != 0 ||
        fread(h.mel_filters.data(), sizeof(float), h.mel_filters.size(), f.file) != h.mel_filters.size())
        return false;
    pos += h.mel_filters.size() * sizeof(float);
    int32_t n_vocab = 0;
    if (pos + 4 > size || !read_i32(f.file, n_vocab) || n_vocab < 0 || n_vocab > (1 << 20)) return false;
    pos += 4;
    for (int32_t i = 0; i < n_vocab; i++) {
        int32_t len = 0;
        if (!read_i32(f.file, len) || len < 0 || pos + 4 + (uint64_t)len > size) return false;
        pos += 4 + (uint64_t)len;
        if (len > 0 && fseeko(f.file, len, SEEK_CUR) != 0) return false;
    }
    h.tensors_start = pos;
    if (h.tensors_start >= size) return false;  // no tensors at all
    why.clear();
    return true;
}

bool report_load_progress(const pb_load_callbacks *callbacks, const char *phase, uint64_t loaded, uint64_t total) {
    if (!callbacks || !PB_HAS(callbacks, progress) || !callbacks->progress) return true;
    return callbacks->progress(callbacks->context, phase, loaded, total) == 0;
}

// ─── The loader ──────────────────────────────────────────────────────────────────────
//
// whisper.cpp cannot be stopped while it loads: it ignores what read() returns, and when it
// gives up halfway (a failed read, a damaged tensor record) it leaks every weight buffer it
// had allocated. So a cancelled load is finished rather than failed, but without reading
// the rest of the weights: the reader follows the tensor records as whisper.cpp reads them,
// and once the host cancelled it serves each tensor's data read by skipping past it in the
// file (the buffer keeps whatever it held). whisper.cpp then reads only the remaining
// records' headers, a few milliseconds, and the caller frees the context it returns.

namespace {

constexpr auto report_interval = std::chrono::milliseconds(50);  // the ABI asks for 100 ms at most
constexpr size_t buffer_size = 1 << 20;  // the vocabulary is 50,000 tiny reads

struct model_reader {
    int fd = -1;
    uint64_t position = 0;  // of the next read, in the file
    uint64_t size = 0;
    uint64_t tensors_start = 0;
    const pb_load_callbacks *callbacks = nullptr;
    std::chrono::steady_clock::time_point last_report{};
    bool cancelled = false;

    // A read-ahead buffer for the small reads: [buffer_start, buffer_start + buffer_len).
    std::vector<char> buffer;
    uint64_t buffer_start = 0;
    size_t buffer_len = 0;

    // The tensor record being read. whisper.cpp reads each field with one read: n_dims,
    // name length, type, each dimension, the name, then the data.
    enum { f_dims_count, f_name_len, f_type, f_dim, f_name, f_data } field = f_dims_count;
    int32_t dims_left = 0;
    bool lost = false;  // the reads stopped matching the record layout: no skipping

    ~model_reader() {
        if (fd >= 0) close(fd);
    }

    // Copies `want` bytes at `position` into `out`; returns how many the file had.
    size_t fill(char *out, size_t want) {
        size_t done = 0;
        while (done < want) {
            uint64_t at = position + done;
            if (at >= buffer_start && at < buffer_start + buffer_len) {
                size_t n = std::min(want - done, (size_t)(buffer_start + buffer_len - at));
                memcpy(out + done, buffer.data() + (at - buffer_start), n);
                done += n;
                continue;
            }
            if (want - done >= buffer_size) {  // a large read goes straight to the caller
                ssize_t n = pread(fd, out + done, want - done, (off_t)at);
                if (n <= 0) break;
                done += (size_t)n;
                continue;
            }
            ssize_t n = pread(fd, buffer.data(), buffer_size, (off_t)at);
            if (n <= 0) break;
            buffer_start = at;
            buffer_len = (size_t)n;
        }
        return done;
    }

    // Follows the tensor record through one read of `n` bytes at `data`.
    void track(const char *data, size_t n) {
        auto value = [&]() {
            int32_t v = 0;
            if (n == 4) memcpy(&v, data, 4);
            else lost = true;
            return v;
        };
        switch (field) {
        case f_dims_count: dims_left = value(); field = f_name_len; break;
        case f_name_len: value(); field = f_type; break;
        case f_type: value(); field = dims_left > 0 ? f_dim : f_name; break;
        case f_dim: value(); field = --dims_left > 0 ? f_dim : f_name; break;
        case f_name: field = f_data; break;
        case f_data: field = f_dims_count; break;
        }
    }
};

// Large reads (a tensor's data) go in pieces, with a progress report after each, so that a
// progress bar moves through the big tensors too.
constexpr size_t progress_piece = 4 << 20;

void report(model_reader *r) {
    r->last_report = std::chrono::steady_clock::now();
    if (!r->cancelled && !report_load_progress(r->callbacks, "load", r->position, r->size)) r->cancelled = true;
}

size_t loader_read(void *context, void *output, size_t size) {
    auto *r = static_cast<model_reader *>(context);
    if (std::chrono::steady_clock::now() - r->last_report >= report_interval) report(r);
    const bool in_tensors = r->position >= r->tensors_start && !r->lost;
    const bool tensor_data = in_tensors && r->field == model_reader::f_data;
    char *out = static_cast<char *>(output);
    size_t done = 0;
    while (done < size) {
        if (tensor_data && r->cancelled) {  // skipped: see above
            r->position += size - done;
            done = size;
            break;
        }
        size_t want = tensor_data ? std::min(size - done, progress_piece) : size - done;
        size_t got = r->fill(out + done, want);
        r->position += got;
        done += got;
        if (got < want) break;
        if (tensor_data && done < size) report(r);
    }
    if (done < size) memset(out + done, 0, size - done);
    if (in_tensors && done == size) r->track(tensor_data ? nullptr : out, size);
    return done;
}

bool loader_eof(void *context) {
    auto *r = static_cast<model_reader *>(context);
    return r->position >= r->size;
}

void loader_close(void *) {}  // the reader closes the file

}  // namespace

whisper_context *load_whisper_model(const std::string &path, const whisper_file_header &header,
                                    const pb_load_callbacks *callbacks, bool &cancelled) {
    cancelled = false;
    model_reader reader;
    reader.fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (reader.fd < 0) return nullptr;
    reader.size = header.file_size;
    reader.tensors_start = header.tensors_start;
    reader.callbacks = callbacks;
    reader.last_report = std::chrono::steady_clock::now();
    reader.buffer.resize(buffer_size);
    whisper_model_loader loader{};
    loader.context = &reader;
    loader.read = loader_read;
    loader.eof = loader_eof;
    loader.close = loader_close;
    whisper_context *ctx = whisper_init_with_params_no_state(&loader, whisper_context_default_params());
    if (reader.cancelled) {
        cancelled = true;
        if (ctx) whisper_free(ctx);
        return nullptr;
    }
    return ctx;
}
