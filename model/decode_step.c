/* The one-token decode step in plain C: the same function as FusedDecoder.step in model/decoder.py.
 *
 * Why C: at batch 1 on a CPU, a PyTorch step is about 130 small operations, and each costs a few
 * microseconds of dispatch before any arithmetic happens: for the default model that overhead is
 * most of the time per token. Here the whole step is one call, and its time is what it has to be,
 * the time to stream the weights from memory once (benchmarks/NOTES.md, "Generation in C").
 * Matrices may be stored as bf16 (the precision training's autocast multiplied them in), which
 * halves that traffic; all arithmetic is fp32.
 *
 * model/native.py compiles this file with the system's C compiler and loads it with ctypes; without
 * a compiler, generation uses the PyTorch step instead. Layouts are those FusedDecoder builds:
 * matrices input-major (in, out), except bf16 ones on a CPU with AVX-512 BF16 (see dot_bf16 below),
 * norm scales folded in, keys/values (layers, B, kv heads, context, head dim). tests/test_model.py
 * checks this step against GPT.forward.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

typedef struct {
    int n_layer, n_embd, n_head, n_kv_head, head_dim, mlp_hidden, vocab, context;
    int bf16;                    /* 1: the matrices below hold bf16 (uint16) values, 0: fp32 */
    float floor, head_floor;     /* sqrt(width * eps): the RMSNorm epsilon, see unit() */
    const float *embed;          /* (vocab, n_embd), fp32 */
    const float *inv_freq;       /* (head_dim / 2): rotary frequencies */
    /* Matrices are input-major (in, out) as listed, or output-major (out, in) when bf16 and
     * OUTPUT_MAJOR_BF16 (see dot_bf16). */
    const void *const *qkv;      /* per layer (n_embd, (n_head + 2 n_kv_head) head_dim) */
    const float *const *qk_norm; /* per layer (n_head + n_kv_head, head_dim) */
    const void *const *o;        /* per layer (n_head head_dim, n_embd) */
    const void *const *gate_up;  /* per layer (n_embd, 2 mlp_hidden) */
    const void *const *down;     /* per layer (mlp_hidden, n_embd) */
    const void *head;            /* (n_embd, vocab) */
} Model;

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;  /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX512BF16__)
/* y (n) += x (k) @ W, with W stored output-major (n, k) in bf16: each output is the dot product of
 * its weight row with x. One AVX-512 BF16 instruction (vdpbf16ps) multiplies 32 bf16 pairs and adds
 * them into 16 fp32 sums, so x is rounded to bf16 once (the precision training's autocast
 * multiplied activations in) and the loop only loads weights: about twice the speed of the portable
 * loop below on the 4 x 256 model's matrices (benchmarks/NOTES.md, "Generation in C"). */
#define OUTPUT_MAJOR_BF16 1
static inline __mmask32 lanes(int left) { return left >= 32 ? 0xffffffffu : (1u << left) - 1; } /* first `left` of 32 */

static void dot_bf16(const float *x, const uint16_t *W, float *y, int k, int n) {
    __m512bh xs[k / 32 + 1];
    for (int i = 0; i < k; i += 32) {  /* x as bf16 pairs, zero past k */
        const __mmask32 m = lanes(k - i);
        xs[i / 32] = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps((__mmask16)(m >> 16), x + i + 16),
                                         _mm512_maskz_loadu_ps((__mmask16)m, x + i));
    }
    int j = 0;
    for (; j + 4 <= n; j += 4) {  /* four outputs at a time: four independent sums share each block of x */
        const uint16_t *w = W + (long)j * k;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int i = 0; i < k; i += 32) {
            const __mmask32 m = lanes(k - i);
            s0 = _mm512_dpbf16_ps(s0, xs[i / 32], (__m512bh)_mm512_maskz_loadu_epi16(m, w + i));
            s1 = _mm512_dpbf16_ps(s1, xs[i / 32], (__m512bh)_mm512_maskz_loadu_epi16(m, w + k + i));
            s2 = _mm512_dpbf16_ps(s2, xs[i / 32], (__m512bh)_mm512_maskz_loadu_epi16(m, w + 2 * k + i));
            s3 = _mm512_dpbf16_ps(s3, xs[i / 32], (__m512bh)_mm512_maskz_loadu_epi16(m, w + 3 * k + i));
        }
        y[j] += _mm512_reduce_add_ps(s0), y[j + 1] += _mm512_reduce_add_ps(s1);
        y[j + 2] += _mm512_reduce_add_ps(s2), y[j + 3] += _mm512_reduce_add_ps(s3);
    }
    for (; j < n; j++) {  /* the last n mod 4 outputs */
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < k; i += 32)
            sum = _mm512_dpbf16_ps(sum, xs[i / 32], (__m512bh)_mm512_maskz_loadu_epi16(lanes(k - i), W + (long)j * k + i));
        y[j] += _mm512_reduce_add_ps(sum);
    }
}
#else
#define OUTPUT_MAJOR_BF16 0
#endif

/* Whether bf16 matrices are expected output-major (n, k): FusedDecoder asks before laying them out. */
int output_major_bf16(void) { return OUTPUT_MAJOR_BF16; }

/* Y (rows, n) += X (rows, k) @ W (k, n). Row i of W is read once for all rows of X; the inner loop
 * is contiguous, so the compiler vectorises it and the step runs at memory speed. */
static void matmul_add(const float *X, const void *W, int bf16, float *Y, int rows, int k, int n) {
#if OUTPUT_MAJOR_BF16
    if (bf16) {
        for (int r = 0; r < rows; r++) dot_bf16(X + (long)r * k, (const uint16_t *)W, Y + (long)r * n, k, n);
        return;
    }
#endif
    for (int i = 0; i < k; i++) {
        for (int r = 0; r < rows; r++) {
            const float xi = X[(long)r * k + i];
            float *y = Y + (long)r * n;
            if (bf16) {
                const uint16_t *w = (const uint16_t *)W + (long)i * n;
                for (int j = 0; j < n; j++) y[j] += xi * from_bf16(w[j]);
            } else {
                const float *w = (const float *)W + (long)i * n;
                for (int j = 0; j < n; j++) y[j] += xi * w[j];
            }
        }
    }
}

static void matmul(const float *X, const void *W, int bf16, float *Y, int rows, int k, int n) {
    memset(Y, 0, sizeof(float) * rows * n);
    matmul_add(X, W, bf16, Y, rows, k, n);
}

/* a . b with 16 independent partial sums, so the compiler can vectorise the reduction. */
static float dot(const float *a, const float *b, int n) {
    float partial[16] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) partial[j] += a[i + j] * b[i + j];
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < 16; j++) sum += partial[j];
    return sum;
}

/* RMSNorm without its learned scale and sqrt(n), which the weights carry: x / sqrt(|x|^2 + floor^2). */
static void unit(const float *x, float *out, int n, float floor) {
    const float inv = 1.0f / sqrtf(dot(x, x, n) + floor * floor);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv;
}

/* Llama's rotate-half rotary embedding of one head vector, in place. */
static void rotate(float *v, int d, const float *cos_, const float *sin_) {
    const int half = d / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_[i] - b * sin_[i];
        v[i + half] = b * cos_[i] + a * sin_[i];
    }
}

/* tokens, positions (B,) -> logits (B, vocab). Writes position `length` of keys/values and attends
 * to positions 0..length; mask (B, length + 1) says which of them each row may see (NULL: all).
 * Returns 0; -2 if a token or the length is out of range (nothing is written); -1 if scratch memory
 * could not be allocated. */
int decode_step(const Model *m, const int64_t *tokens, const int64_t *positions, int B, float *keys, float *values,
                int length, const uint8_t *mask, float *logits) {
    if (length < 0 || length >= m->context) return -2;
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -2;
    const int C = m->n_embd, H = m->n_head, Hkv = m->n_kv_head, D = m->head_dim, F = m->mlp_hidden;
    const int QKV = (H + 2 * Hkv) * D, half = D / 2;
    float *x = malloc(sizeof(float) * B * C), *normed = malloc(sizeof(float) * B * C);
    float *qkv = malloc(sizeof(float) * B * QKV), *attended = malloc(sizeof(float) * B * H * D);
    float *hidden = malloc(sizeof(float) * B * 2 * F), *act = malloc(sizeof(float) * B * F);
    float *scores = malloc(sizeof(float) * (length + 1)), *rot = malloc(sizeof(float) * B * D);
    if (!x || !normed || !qkv || !attended || !hidden || !act || !scores || !rot) {
        free(x), free(normed), free(qkv), free(attended), free(hidden), free(act), free(scores), free(rot);
        return -1;
    }
    for (int b = 0; b < B; b++) {
        memcpy(x + b * C, m->embed + tokens[b] * C, sizeof(float) * C);
        for (int i = 0; i < half; i++) {  /* cos then sin of this row's position, per frequency */
            const float angle = (float)positions[b] * m->inv_freq[i];
            rot[b * D + i] = cosf(angle), rot[b * D + half + i] = sinf(angle);
        }
    }
    for (int l = 0; l < m->n_layer; l++) {
        /* attention: x += attend(q, k, v) @ Wo, with q, k, v = unit(x) @ Wqkv */
        for (int b = 0; b < B; b++) unit(x + b * C, normed + b * C, C, m->floor);
        matmul(normed, m->qkv[l], m->bf16, qkv, B, C, QKV);
        for (int b = 0; b < B; b++) {
            float *row = qkv + (long)b * QKV;
            for (int h = 0; h < H + Hkv; h++) {  /* q and k heads: norm, scale, rotate */
                float *v = row + h * D;
                unit(v, v, D, m->head_floor);
                for (int i = 0; i < D; i++) v[i] *= m->qk_norm[l][h * D + i];
                rotate(v, D, rot + b * D, rot + b * D + half);
            }
            for (int g = 0; g < Hkv; g++) {
                const long at = ((((long)l * B + b) * Hkv + g) * m->context + length) * D;
                memcpy(keys + at, row + (H + g) * D, sizeof(float) * D);
                memcpy(values + at, row + (H + Hkv + g) * D, sizeof(float) * D);
            }
            for (int h = 0; h < H; h++) {  /* softmax(q . k_t) weighted sum of v_t; 1/sqrt(D) is in the norms */
                const int g = h / (H / Hkv);
                const float *q = row + h * D;
                const float *k0 = keys + (((long)l * B + b) * Hkv + g) * m->context * D;
                const float *v0 = values + (((long)l * B + b) * Hkv + g) * m->context * D;
                float best = -INFINITY, total = 0.0f;
                for (int t = 0; t <= length; t++) {
                    const int seen = !mask || mask[(long)b * (length + 1) + t];
                    scores[t] = seen ? dot(q, k0 + (long)t * D, D) : -INFINITY;
                    if (scores[t] > best) best = scores[t];
                }
                float *out = attended + ((long)b * H + h) * D;
                memset(out, 0, sizeof(float) * D);
                for (int t = 0; t <= length; t++) {
                    const float p = expf(scores[t] - best);
                    total += p;
                    for (int i = 0; i < D; i++) out[i] += p * v0[(long)t * D + i];
                }
                for (int i = 0; i < D; i++) out[i] /= total;
            }
        }
        matmul_add(attended, m->o[l], m->bf16, x, B, H * D, C);
        /* MLP: x += (silu(gate) * up) @ Wdown, with gate, up = unit(x) @ Wgate_up */
        for (int b = 0; b < B; b++) unit(x + b * C, normed + b * C, C, m->floor);
        matmul(normed, m->gate_up[l], m->bf16, hidden, B, C, 2 * F);
        for (int b = 0; b < B; b++) {
            for (int i = 0; i < F; i++) {
                const float gate = hidden[(long)b * 2 * F + i], up = hidden[(long)b * 2 * F + F + i];
                act[(long)b * F + i] = gate / (1.0f + expf(-gate)) * up;
            }
        }
        matmul_add(act, m->down[l], m->bf16, x, B, F, C);
    }
    for (int b = 0; b < B; b++) unit(x + b * C, normed + b * C, C, m->floor);
    matmul(normed, m->head, m->bf16, logits, B, C, m->vocab);
    free(x), free(normed), free(qkv), free(attended), free(hidden), free(act), free(scores), free(rot);
    return 0;
}

/* The token each row samples next: logits (B, n), rows `stride` floats apart -> tokens (B,), drawn
 * from softmax(logits / temperature) by the inverse CDF at u[b] in [0, 1): the first token whose
 * running sum of probabilities exceeds u[b]. Tokens at -inf are never drawn. The engine's PyTorch
 * draw (model/engine.py) computes the same thing in eight operations, each costing more dispatch than
 * this whole loop over the vocabulary. Returns 0, or -1 if scratch memory could not be allocated. */
int draw_tokens(const float *logits, int B, int n, long stride, float temperature, const float *u, int64_t *tokens) {
    float *p = malloc(sizeof(float) * n);
    if (!p) return -1;
    for (int b = 0; b < B; b++) {
        const float *row = logits + b * stride;
        float best = -INFINITY, total = 0.0f;
        for (int i = 0; i < n; i++) best = row[i] > best ? row[i] : best;
        for (int i = 0; i < n; i++) total += p[i] = expf((row[i] - best) / temperature);
        const float target = u[b] * total;
        int chosen = -1;
        float sum = 0.0f;
        for (int i = 0; i < n && chosen < 0; i++)
            if (p[i] > 0.0f && (sum += p[i]) > target) chosen = i;
        for (int i = n - 1; chosen < 0 && i >= 0; i--)  /* rounding left the sum at or under the target */
            if (p[i] > 0.0f) chosen = i;
        tokens[b] = chosen;
    }
    free(p);
    return 0;
}
