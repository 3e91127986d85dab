// mel.cpp — Whisper's log-mel spectrogram, made by the plugin so that a cancel can stop it.
//
// whisper.cpp makes the spectrogram of the whole audio in one uninterruptible call (about
// 2 ms per second of audio per thread: seconds for a long file). This is the same
// computation (log_mel_spectrogram in whisper.cpp, after OpenAI's whisper/audio.py): a
// 400-point periodic Hann window every 160 samples, 200 samples of reflection before the
// audio and 30 s of silence after it, power spectrum, the model's mel filter bank, log10,
// clamped to 8 below the maximum and scaled by (x + 4) / 4. It is handed over with
// whisper_set_mel_with_state.
#include "whisper_plugin.h"

#include <algorithm>
#include <cmath>
#include <complex>
#include <thread>

namespace {

using complex = std::complex<float>;
constexpr int frame_size = WHISPER_N_FFT;      // 400
constexpr int frame_step = WHISPER_HOP_LENGTH;  // 160
constexpr int n_bins = 1 + frame_size / 2;     // 201
constexpr int reflect = frame_size / 2;        // samples of reflection before the audio

struct tables {
    float hann[frame_size];
    complex twiddle[frame_size];  // exp(-2πi k / 400)
    tables() {
        for (int i = 0; i < frame_size; i++) {
            // Single-precision cosines, as whisper.cpp's tables, so both spectrograms agree.
            const float theta = (float)(2.0 * M_PI * i / frame_size);
            hann[i] = (float)(0.5 * (1.0 - cosf(theta)));
            twiddle[i] = complex(cosf(theta), -sinf(theta));
        }
    }
};
const tables &shared_tables() {
    static const tables t;
    return t;
}

// The DFT of n real values x[0], x[stride], …: halved while n is even (400 → 25), direct
// below that; `out` gets all n complex bins.
void fft(const float *x, int stride, int n, complex *out, const tables &t) {
    const int step = frame_size / n;
    if (n % 2 == 1) {
        for (int k = 0; k < n; k++) {
            complex sum = 0;
            for (int j = 0; j < n; j++) sum += x[j * stride] * t.twiddle[(j * k % n) * step];
            out[k] = sum;
        }
        return;
    }
    const int half = n / 2;
    fft(x, stride * 2, half, out, t);                // even samples into out[0, half)
    fft(x + stride, stride * 2, half, out + half, t);  // odd ones into out[half, n)
    for (int k = 0; k < half; k++) {
        complex even = out[k], odd = t.twiddle[k * step] * out[k + half];
        out[k] = even + odd;
        out[k + half] = even - odd;
    }
}

// The non-zero stretch of each mel filter: the bank is triangular, mostly zeros.
struct filter_span {
    int first = 0, last = 0;  // [first, last)
};

}  // namespace

bool compute_mel(const std::vector<float> &samples, const std::vector<float> &filters, int n_mel, int threads,
                 const std::function<bool()> &stop, mel_spectrogram &mel) {
    const tables &t = shared_tables();
    const int64_t n = (int64_t)samples.size();
    const int64_t padded = n + WHISPER_SAMPLE_RATE * 30 + 2 * reflect;  // as whisper.cpp pads
    mel.n_mel = n_mel;
    mel.n_len = (int)((padded - frame_size) / frame_step);
    mel.n_len_org = (int)(1 + (n + reflect - frame_size) / frame_step);
    mel.data.assign((size_t)n_mel * mel.n_len, 0.0f);

    std::vector<filter_span> spans(n_mel);
    for (int j = 0; j < n_mel; j++) {
        const float *f = filters.data() + (size_t)j * n_bins;
        int first = 0, last = n_bins;
        while (first < n_bins && f[first] == 0.0f) first++;
        while (last > first && f[last - 1] == 0.0f) last--;
        spans[j] = {first, last};
    }

    // The padded signal at position k: reflection, the audio, then silence.
    auto sample = [&](int64_t k) -> float {
        if (k < reflect) return samples[(size_t)(reflect - k)];
        k -= reflect;
        return k < n ? samples[(size_t)k] : 0.0f;
    };
    const int64_t signal = n + reflect;  // past this only silence: those frames are log10(1e-10)
    const int n_computed = (int)std::min<int64_t>(signal / frame_step + 1, mel.n_len);

    std::atomic<bool> quit{false};
    auto worker = [&](int first_frame) {
        float in[frame_size];
        complex out[frame_size];
        float power[n_bins];
        for (int i = first_frame, count = 0; i < n_computed; i += threads, count++) {
            if (quit.load(std::memory_order_relaxed)) return;
            if (first_frame == 0 && count % 64 == 63 && stop()) {  // the caller's thread asks
                quit = true;
                return;
            }
            const int64_t offset = (int64_t)i * frame_step;
            for (int j = 0; j < frame_size; j++)
                in[j] = offset + j < signal ? t.hann[j] * sample(offset + j) : 0.0f;
            fft(in, 1, frame_size, out, t);
            for (int k = 0; k < n_bins; k++) power[k] = std::norm(out[k]);
            for (int j = 0; j < n_mel; j++) {
                const float *f = filters.data() + (size_t)j * n_bins;
                double sum = 0.0;
                for (int k = spans[j].first; k < spans[j].last; k++) sum += power[k] * f[k];
                mel.data[(size_t)j * mel.n_len + i] = (float)std::log10(std::max(sum, 1e-10));
            }
        }
    };
    std::vector<std::thread> helpers;
    for (int w = 1; w < threads; w++) helpers.emplace_back(worker, w);
    worker(0);
    for (auto &helper : helpers) helper.join();
    if (quit.load()) return false;

    const float silence = -10.0f;  // log10(1e-10)
    for (int j = 0; j < n_mel; j++)
        std::fill(mel.data.begin() + (size_t)j * mel.n_len + n_computed, mel.data.begin() + (size_t)(j + 1) * mel.n_len,
                  silence);
    const double floor = (double)*std::max_element(mel.data.begin(), mel.data.end()) - 8.0;
    for (float &v : mel.data) v = (float)((std::max((double)v, floor) + 4.0) / 4.0);
    return true;
}
