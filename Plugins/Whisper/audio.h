// audio.h — a WAV file into what whisper.cpp takes: 16 kHz mono float samples.
//
// Only RIFF/WAVE is read (no codec library in the plugin): PCM 8/16/24/32-bit and IEEE
// float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE, any sample rate, any number of
// channels (averaged to mono). Nothing here touches whisper.cpp, so the parser can be
// fuzzed on its own.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// A parsed WAV file. `data` points into the caller's buffer (the host's byte input, which
// stays valid until run_destroy), so parsing copies nothing.
struct wav_info {
    uint16_t format = 0;       // 1: integer PCM, 3: IEEE float (EXTENSIBLE unwrapped)
    uint16_t channels = 0;
    uint32_t sample_rate = 0;
    uint16_t bits = 0;         // container bits per sample
    const uint8_t *data = nullptr;
    size_t frames = 0;         // whole frames in `data`
    double seconds() const { return sample_rate ? (double)frames / sample_rate : 0; }
};

// The longest audio accepted. A transcription holds the samples (230 MB an hour at 16 kHz)
// and the whole log-mel spectrogram (115 MB an hour for 80 bands, twice while it is
// handed to whisper.cpp).
constexpr double max_audio_seconds = 2 * 3600;

// Reads the RIFF header and finds the samples. Returns false with `error` (a message for
// the client) when the bytes are not a WAV file this plugin decodes, or hold no samples.
bool wav_parse(const uint8_t *bytes, size_t size, wav_info &info, std::string &error);

// The samples averaged to mono and resampled to `rate`. Stops early, returning what it
// has, when `stop` becomes true (a cancelled run).
std::vector<float> wav_to_mono(const wav_info &info, uint32_t rate, const std::atomic<bool> *stop = nullptr);

// Band-limited resampling (a Kaiser-windowed sinc, tabulated finely and interpolated),
// for any pair of rates.
std::vector<float> resample(const std::vector<float> &in, uint32_t from, uint32_t to,
                            const std::atomic<bool> *stop = nullptr);
