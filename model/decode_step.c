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
 * matrices input-major (in, out), norm scales folded in, keys/values (layers, B, kv heads, context,
 * head dim). tests/test_model.py checks this step against GPT.forward.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int n_layer, n_embd, n_head, n_kv_head, head_dim, mlp_hidden, vocab, context;
    int bf16;                    /* 1: the matrices below hold bf16 (uint16) values, 0: fp32 */
    float floor, head_floor;     /* sqrt(width * eps): the RMSNorm epsilon, see unit() */
    const float *embed;          /* (vocab, n_embd), fp32 */
    const float *inv_freq;       /* (head_dim / 2): rotary frequencies */
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

/* Y (rows, n) += X (rows, k) @ W (k, n). Row i of W is read once for all rows of X; the inner loop
 * is contiguous, so the compiler vectorises it and the step runs at memory speed. */
static void matmul_add(const float *X, const void *W, int bf16, float *Y, int rows, int k, int n) {
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
