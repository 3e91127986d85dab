// audio.cpp — WAV parsing, decoding to mono, resampling (see audio.h).
//
// The bytes come from a client, so every length read from the file is checked against the
// buffer before it is used, and arithmetic on them is done in 64 bits.
#include "audio.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

constexpr const char *supported_formats = "only WAV (PCM 8/16/24/32-bit or 32/64-bit float samples) is accepted";
constexpr uint32_t min_rate = 1000;
constexpr uint32_t max_rate = 384000;
constexpr uint16_t max_channels = 64;

bool unsupported(std::string &error, const std::string &reason) {
    error = std::string("Unsupported audio: ") + supported_formats + "; " + reason + ".";
    return false;
}

uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

// A four-character code as text, for messages (bytes that are not printable become '?').
std::string fourcc(const uint8_t *p) {
    std::string s(4, '?');
    for (int i = 0; i < 4; i++)
        if (p[i] >= 0x20 && p[i] < 0x7f) s[i] = (char)p[i];
    return s;
}

// What the bytes are when they are not RIFF/WAVE, so the message can say "this is MP3".
std::string sniff(const uint8_t *b, size_t size) {
    auto starts = [&](const char *magic, size_t at = 0) {
        size_t n = strlen(magic);
        return size >= at + n && memcmp(b + at, magic, n) == 0;
    };
    if (starts("ID3") || (size >= 2 && b[0] == 0xff && (b[1] & 0xe0) == 0xe0)) return "this looks like MP3";
    if (starts("fLaC")) return "this looks like FLAC";
    if (starts("OggS")) return "this looks like Ogg (Vorbis or Opus)";
    if (starts("ftyp", 4)) return "this looks like MP4/M4A";
    if (starts("\x1a\x45\xdf\xa3")) return "this looks like WebM/Matroska";
    if (starts("FORM")) return "this looks like AIFF";
    if (starts("#!AMR")) return "this looks like AMR";
    if (starts("caff")) return "this looks like Core Audio (CAF)";
    if (starts("RIFX")) return "this is a big-endian RIFX file";
    if (starts("RF64") || starts("BW64")) return "this is an RF64/BW64 file (64-bit WAV)";
    return "the data is not a RIFF/WAVE file";
}

std::string format_name(uint16_t tag) {
    switch (tag) {
    case 0x0002: return "Microsoft ADPCM";
    case 0x0006: return "A-law";
    case 0x0007: return "mu-law";
    case 0x0011: return "IMA ADPCM";
    case 0x0031: return "GSM 6.10";
    case 0x0050: return "MPEG audio";
    case 0x0055: return "MP3";
    default: return "codec";
    }
}

// The GUID of a WAVE_FORMAT_EXTENSIBLE sub-format after its first two bytes (the format
// tag): KSDATAFORMAT_SUBTYPE_PCM and _IEEE_FLOAT share it.
const uint8_t guid_tail[14] = {0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71};

// Reads the fmt chunk's body (`size` bytes, already checked to lie in the buffer).
bool read_fmt(const uint8_t *p, size_t size, wav_info &info, std::string &error) {
    if (size < 16) return unsupported(error, "its fmt chunk is truncated");
    uint16_t tag = le16(p);
    info.channels = le16(p + 2);
    info.sample_rate = le32(p + 4);
    info.bits = le16(p + 14);
    if (tag == 0xfffe) {  // WAVE_FORMAT_EXTENSIBLE: the real format is in the sub-format GUID
        if (size < 40 || le16(p + 16) < 22) return unsupported(error, "its WAVE_FORMAT_EXTENSIBLE header is truncated");
        if (memcmp(p + 26, guid_tail, sizeof guid_tail) != 0)
            return unsupported(error, "its WAVE_FORMAT_EXTENSIBLE sub-format is not PCM or float");
        tag = le16(p + 24);
    }
    char detail[160];
    if (tag == 1) {
        if (info.bits != 8 && info.bits != 16 && info.bits != 24 && info.bits != 32) {
            snprintf(detail, sizeof detail, "it holds %u-bit PCM", (unsigned)info.bits);
            return unsupported(error, detail);
        }
    } else if (tag == 3) {
        if (info.bits != 32 && info.bits != 64) {
            snprintf(detail, sizeof detail, "it holds %u-bit float samples", (unsigned)info.bits);
            return unsupported(error, detail);
        }
    } else {
        snprintf(detail, sizeof detail, "its samples are encoded as %s (format tag 0x%04x)", format_name(tag).c_str(),
                 (unsigned)tag);
        return unsupported(error, detail);
    }
    info.format = tag;
    if (info.channels == 0 || info.channels > max_channels) {
        snprintf(detail, sizeof detail, "its header claims %u channels (1 to %u are accepted)", (unsigned)info.channels,
                 (unsigned)max_channels);
        return unsupported(error, detail);
    }
    if (info.sample_rate < min_rate || info.sample_rate > max_rate) {
        snprintf(detail, sizeof detail, "its header claims a sample rate of %u Hz (%u to %u Hz are accepted)",
                 (unsigned)info.sample_rate, (unsigned)min_rate, (unsigned)max_rate);
        return unsupported(error, detail);
    }
    // The block alignment field is not trusted: a frame is always channels × sample size.
    return true;
}

// One sample at `p` as a float in [-1, 1] (float input is passed through, minus NaN/inf).
inline float sample_at(const uint8_t *p, uint16_t format, uint16_t bits) {
    if (format == 3) {
        if (bits == 32) {
            float v;
            memcpy(&v, p, 4);
            return std::isfinite(v) ? v : 0.0f;
        }
        double v;
        memcpy(&v, p, 8);
        return std::isfinite(v) ? (float)v : 0.0f;
    }
    switch (bits) {
    case 8: return ((int)p[0] - 128) / 128.0f;  // 8-bit WAV is unsigned
    case 16: return (int16_t)le16(p) / 32768.0f;
    case 24: return (int32_t)(((uint32_t)p[0] << 8) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 24)) / 2147483648.0f;
    default: return (int32_t)le32(p) / 2147483648.0f;
    }
}

// Mono samples [first, first + count) of the file: each frame's channels averaged.
void decode_mono(const wav_info &info, size_t first, size_t count, float *out) {
    const size_t bytes = info.bits / 8;
    const size_t frame = bytes * info.channels;
    const uint8_t *p = info.data + first * frame;
    const float scale = 1.0f / info.channels;
    for (size_t i = 0; i < count; i++, p += frame) {
        if (info.channels == 1) {
            out[i] = sample_at(p, info.format, info.bits);
            continue;
        }
        float sum = 0;
        for (size_t c = 0; c < info.channels; c++) sum += sample_at(p + c * bytes, info.format, info.bits);
        out[i] = sum * scale;
    }
}

// ─── Resampling ──────────────────────────────────────────────────────────────────────

// The filter: sinc(u)·kaiser(u) for u in [0, zero_crossings], tabulated `resolution` points
// per zero crossing and interpolated linearly between them (J. O. Smith's band-limited
// interpolation). 12 zero crossings and β = 8 give about 80 dB of stop-band rejection.
constexpr int zero_crossings = 12;
constexpr int resolution = 256;
constexpr double kaiser_beta = 8.0;
// The cutoff as a fraction of the lower of the two Nyquist frequencies: the transition
// band lies just below it, so nothing above the output's Nyquist folds back.
constexpr double rolloff = 0.92;

double bessel_i0(double x) {
    double sum = 1, term = 1;
    for (int k = 1; k < 64; k++) {
        term *= (x / (2 * k)) * (x / (2 * k));
        sum += term;
        if (term < 1e-15 * sum) break;
    }
    return sum;
}

std::vector<float> make_filter_table() {
    const size_t n = (size_t)zero_crossings * resolution;
    std::vector<float> table(n + 2, 0.0f);  // two zeros past the end for the interpolation
    const double norm = bessel_i0(kaiser_beta);
    for (size_t i = 0; i <= n; i++) {
        double u = (double)i / resolution;
        double sinc = i == 0 ? 1.0 : std::sin(M_PI * u) / (M_PI * u);
        double r = u / zero_crossings;
        double window = bessel_i0(kaiser_beta * std::sqrt(std::max(0.0, 1.0 - r * r))) / norm;
        table[i] = (float)(sinc * window);
    }
    return table;
}

// Resamples `n_in` input samples, which `fill(first, count, out)` produces on demand, so a
// long file is never decoded whole at its own rate.
template <class Fill>
std::vector<float> resample_source(Fill fill, size_t n_in, uint32_t from, uint32_t to, const std::atomic<bool> *stop) {
    static const std::vector<float> table = make_filter_table();
    const double cutoff = 0.5 * rolloff * std::min(1.0, (double)to / from);  // cycles per input sample
    const double scale = 2 * cutoff;            // zero crossings per input sample
    const double half = zero_crossings / scale;  // the filter's half-width, in input samples
    const double step = scale * resolution;      // table points per input sample
    const size_t n_out = (size_t)((uint64_t)n_in * to / from);
    std::vector<float> out(n_out);
    std::vector<float> window;
    constexpr size_t block = 1 << 15;  // output samples per decoded stretch of input
    for (size_t m0 = 0; m0 < n_out; m0 += block) {
        if (stop && stop->load(std::memory_order_relaxed)) {
            out.resize(m0);
            break;
        }
        const size_t m1 = std::min(n_out, m0 + block);
        const double t_first = (double)m0 * from / to, t_last = (double)(m1 - 1) * from / to;
        const int64_t lo = std::max<int64_t>(0, (int64_t)std::ceil(t_first - half));
        const int64_t hi = std::min<int64_t>((int64_t)n_in - 1, (int64_t)std::floor(t_last + half));
        window.resize((size_t)(hi - lo + 1));
        fill((size_t)lo, window.size(), window.data());
        for (size_t m = m0; m < m1; m++) {
            const double t = (double)m * from / to;  // the output instant, in input samples
            const int64_t i0 = std::max<int64_t>(lo, (int64_t)std::ceil(t - half));
            const int64_t i1 = std::min<int64_t>(hi, (int64_t)std::floor(t + half));
            double acc = 0;
            double u = (i0 - t) * step;  // signed table position of tap i0
            for (int64_t i = i0; i <= i1; i++, u += step) {
                double a = std::fabs(u);
                size_t k = (size_t)a;
                if (k >= table.size() - 1) continue;
                double w = table[k] + (a - (double)k) * (table[k + 1] - table[k]);
                acc += window[(size_t)(i - lo)] * w;
            }
            out[m] = (float)(acc * scale);
        }
    }
    return out;
}

}  // namespace

bool wav_parse(const uint8_t *bytes, size_t size, wav_info &info, std::string &error) {
    info = wav_info();
    if (!bytes || size < 12) return unsupported(error, size == 0 ? "the audio is empty" : "the data is too short to be a WAV file");
    if (memcmp(bytes, "RIFF", 4) != 0) return unsupported(error, sniff(bytes, size));
    if (memcmp(bytes + 8, "WAVE", 4) != 0)
        return unsupported(error, "it is a RIFF file of type '" + fourcc(bytes + 8) + "', not WAVE");

    // Walk the chunks. The RIFF size is ignored (streamed files leave it wrong), unknown
    // chunks (LIST, fact, cue, …) are skipped, and a data chunk that claims more than the
    // buffer holds is read as far as the buffer goes (streamed files again).
    bool have_fmt = false, have_data = false;
    const uint8_t *data = nullptr;
    size_t data_size = 0;
    size_t pos = 12;
    while (size - pos >= 8) {
        const uint8_t *chunk = bytes + pos;
        const uint64_t chunk_size = le32(chunk + 4);
        const size_t body = pos + 8;
        const size_t available = size - body;
        if (memcmp(chunk, "fmt ", 4) == 0 && !have_fmt) {
            if (chunk_size > available) return unsupported(error, "its fmt chunk is truncated");
            if (!read_fmt(bytes + body, (size_t)chunk_size, info, error)) return false;
            have_fmt = true;
        } else if (memcmp(chunk, "data", 4) == 0 && !have_data) {
            data = bytes + body;
            data_size = (size_t)std::min<uint64_t>(chunk_size, available);
            have_data = true;
        }
        if (chunk_size > available) break;  // the last chunk, cut short
        const uint64_t next = body + chunk_size + (chunk_size & 1);  // chunks are padded to even sizes
        if (next >= size) break;
        pos = (size_t)next;
    }
    if (!have_fmt) return unsupported(error, "it has no fmt chunk");
    if (!have_data) return unsupported(error, "it has no data chunk");

    const size_t frame = (size_t)(info.bits / 8) * info.channels;
    info.data = data;
    info.frames = data_size / frame;
    if (info.frames == 0) {
        error = "The audio is empty: the WAV file holds no samples.";
        return false;
    }
    if (info.seconds() > max_audio_seconds) {
        char message[160];
        snprintf(message, sizeof message, "The audio is %.0f minutes long; at most %.0f minutes are accepted.",
                 info.seconds() / 60, max_audio_seconds / 60);
        error = message;
        return false;
    }
    return true;
}

std::vector<float> wav_to_mono(const wav_info &info, uint32_t rate, const std::atomic<bool> *stop) {
    if (info.sample_rate == rate) {
        std::vector<float> out(info.frames);
        decode_mono(info, 0, info.frames, out.data());
        return out;
    }
    auto fill = [&info](size_t first, size_t count, float *out) { decode_mono(info, first, count, out); };
    return resample_source(fill, info.frames, info.sample_rate, rate, stop);
}

std::vector<float> resample(const std::vector<float> &in, uint32_t from, uint32_t to, const std::atomic<bool> *stop) {
    if (from == to || in.empty()) return in;
    auto fill = [&in](size_t first, size_t count, float *out) { memcpy(out, in.data() + first, count * sizeof(float)); };
    return resample_source(fill, in.size(), from, to, stop);
}
