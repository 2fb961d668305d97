/* The one-token decode step in plain C: the same function as FusedDecoder.step in model/decoder.py.
 *
 * Why C: at batch 1 on a CPU, a PyTorch step is about 130 small operations, and each costs a few
 * microseconds of dispatch before any arithmetic happens: for the default model that overhead is
 * most of the time per token. Here the whole step is one call, and its time is what it has to be,
 * the time to stream the weights from memory once (benchmarks/NOTES.md, "Generation in C").
 * Matrices may be stored as int8 with one scale per output, a quarter of fp32's traffic; all
 * arithmetic is fp32 except their dot products, which are exact integer sums (see matmul_add_int8).
 *
 * model/native.py compiles this file with the system's C compiler and loads it with ctypes; without
 * a compiler, generation uses the PyTorch step instead. Layouts are those FusedDecoder builds:
 * fp32 matrices input-major (in, out), int8 ones output-major (out, in), norm scales folded in,
 * keys/values (layers, B, kv heads, context, head dim) in fp32, or in bf16 (half the traffic of
 * attention over a long cache) when the engine computes in bf16. tests/test_model.py checks this
 * step against GPT.forward.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *values;   /* fp32 input-major (in, out), or int8 output-major (out, in) when scales is set */
    const float *scales;  /* int8 only: weight (out, in) = scales[out] * values[out][in]; NULL for fp32 */
} Matrix;

typedef struct {
    int n_layer, n_embd, n_head, n_kv_head, head_dim, mlp_hidden, vocab, context;
    float floor, head_floor;     /* sqrt(width * eps): the RMSNorm epsilon, see unit() */
    const float *embed;          /* (vocab, n_embd), fp32 */
    const float *inv_freq;       /* (head_dim / 2): rotary frequencies */
    const Matrix *qkv;           /* per layer (n_embd, (n_head + 2 n_kv_head) head_dim) */
    const float *const *qk_norm; /* per layer (n_head + n_kv_head, head_dim) */
    const Matrix *o;             /* per layer (n_head head_dim, n_embd) */
    const Matrix *gate_up;       /* per layer (n_embd, 2 mlp_hidden) */
    const Matrix *down;          /* per layer (mlp_hidden, n_embd) */
    Matrix head;                 /* (n_embd, vocab) */
} Model;

/* y (n) += x (k) @ W for an int8 W. x is rounded to int16 with one scale for the whole vector, so
 * each output is an exact integer dot product of its weight row with x; compilers vectorise that
 * loop as 16-bit multiply-adds (pmaddwd, or vpdpwssd with AVX-512 VNNI) without any intrinsics, and
 * it runs at the speed of reading a byte per weight (benchmarks/NOTES.md, "Int8 weights for the
 * decode step"). The largest |x| maps to `top`, chosen so that no int32 sum can overflow. Four
 * outputs at a time share each load of x. */
static void matmul_add_int8(const float *x, const Matrix *W, float *y, int k, int n) {
    const int8_t *values = (const int8_t *)W->values;
    int16_t xq[k];
    float largest = 0.0f;
    for (int i = 0; i < k; i++) largest = fabsf(x[i]) > largest ? fabsf(x[i]) : largest;
    const float top = fminf(32767.0f, (float)(INT32_MAX / (127L * k)));
    const float step = largest > 0.0f ? largest / top : 1.0f;  /* x[i] ~ step * xq[i] */
    for (int i = 0; i < k; i++) xq[i] = (int16_t)lrintf(x[i] / step);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const int8_t *w = values + (long)j * k;
        int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int i = 0; i < k; i++) {
            s0 += xq[i] * w[i], s1 += xq[i] * w[k + i];
            s2 += xq[i] * w[2 * k + i], s3 += xq[i] * w[3 * k + i];
        }
        y[j] += step * W->scales[j] * (float)s0, y[j + 1] += step * W->scales[j + 1] * (float)s1;
        y[j + 2] += step * W->scales[j + 2] * (float)s2, y[j + 3] += step * W->scales[j + 3] * (float)s3;
    }
    for (; j < n; j++) {  /* the last n mod 4 outputs */
        const int8_t *w = values + (long)j * k;
        int32_t sum = 0;
        for (int i = 0; i < k; i++) sum += xq[i] * w[i];
        y[j] += step * W->scales[j] * (float)sum;
    }
}

/* Y (rows, n) += X (rows, k) @ W (k, n). An fp32 W is read once for all rows of X (row i of W
 * against column i of X; the inner loop is contiguous, so the compiler vectorises it and the step
 * runs at memory speed); an int8 W is read once per row of X, which at batch 1 is once. */
static void matmul_add(const float *X, const Matrix *W, float *Y, int rows, int k, int n) {
    if (W->scales) {
        for (int r = 0; r < rows; r++) matmul_add_int8(X + (long)r * k, W, Y + (long)r * n, k, n);
        return;
    }
    for (int i = 0; i < k; i++) {
        const float *w = (const float *)W->values + (long)i * n;
        for (int r = 0; r < rows; r++) {
            const float xi = X[(long)r * k + i];
            float *y = Y + (long)r * n;
            for (int j = 0; j < n; j++) y[j] += xi * w[j];
        }
    }
}

static void matmul(const float *X, const Matrix *W, float *Y, int rows, int k, int n) {
    memset(Y, 0, sizeof(float) * rows * n);
    matmul_add(X, W, Y, rows, k, n);
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

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;  /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest, ties to even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* The key/value cache's head vectors, fp32 or bf16: store one, dot one with q, add p times one.
 * The bf16 loops convert as they go: converting each vector into a buffer for dot() measured
 * 0.54-0.58 ms a step at a 255-token cache against 0.49 (benchmarks/NOTES.md). */
static void store_cached(void *cache, long at, const float *v, int D, int bf16) {
    if (!bf16) {
        memcpy((float *)cache + at, v, sizeof(float) * D);
        return;
    }
    for (int i = 0; i < D; i++) ((uint16_t *)cache)[at + i] = to_bf16(v[i]);
}

static float dot_cached(const float *q, const void *cache, long at, int D, int bf16) {
    if (!bf16) return dot(q, (const float *)cache + at, D);
    const uint16_t *k = (const uint16_t *)cache + at;
    float partial[16] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + 16 <= D; i += 16)
        for (int j = 0; j < 16; j++) partial[j] += q[i + j] * from_bf16(k[i + j]);
    for (; i < D; i++) sum += q[i] * from_bf16(k[i]);
    for (int j = 0; j < 16; j++) sum += partial[j];
    return sum;
}

static void add_cached(float *out, float p, const void *cache, long at, int D, int bf16) {
    if (!bf16) {
        const float *v = (const float *)cache + at;
        for (int i = 0; i < D; i++) out[i] += p * v[i];
        return;
    }
    const uint16_t *v = (const uint16_t *)cache + at;
    for (int i = 0; i < D; i++) out[i] += p * from_bf16(v[i]);
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

/* tokens, positions (B,) -> logits (B, vocab). Writes position `length` of keys/values (bf16 if
 * kv_bf16, else fp32) and attends to positions 0..length; mask (B, length + 1) says which of them
 * each row may see (NULL: all).
 * Returns 0; -2 if a token or the length is out of range (nothing is written); -1 if scratch memory
 * could not be allocated. */
int decode_step(const Model *m, const int64_t *tokens, const int64_t *positions, int B, void *keys, void *values,
                int kv_bf16, int length, const uint8_t *mask, float *logits) {
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
        matmul(normed, &m->qkv[l], qkv, B, C, QKV);
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
                store_cached(keys, at, row + (H + g) * D, D, kv_bf16);
                store_cached(values, at, row + (H + Hkv + g) * D, D, kv_bf16);
            }
            for (int h = 0; h < H; h++) {  /* softmax(q . k_t) weighted sum of v_t; 1/sqrt(D) is in the norms */
                const int g = h / (H / Hkv);
                const float *q = row + h * D;
                const long first = (((long)l * B + b) * Hkv + g) * m->context * D;  /* position 0 of this head */
                float best = -INFINITY, total = 0.0f;
                for (int t = 0; t <= length; t++) {
                    const int seen = !mask || mask[(long)b * (length + 1) + t];
                    scores[t] = seen ? dot_cached(q, keys, first + (long)t * D, D, kv_bf16) : -INFINITY;
                    if (scores[t] > best) best = scores[t];
                }
                float *out = attended + ((long)b * H + h) * D;
                memset(out, 0, sizeof(float) * D);
                for (int t = 0; t <= length; t++) {
                    const float p = expf(scores[t] - best);
                    total += p;
                    add_cached(out, p, values, first + (long)t * D, D, kv_bf16);
                }
                for (int i = 0; i < D; i++) out[i] /= total;
            }
        }
        matmul_add(attended, &m->o[l], x, B, H * D, C);
        /* MLP: x += (silu(gate) * up) @ Wdown, with gate, up = unit(x) @ Wgate_up */
        for (int b = 0; b < B; b++) unit(x + b * C, normed + b * C, C, m->floor);
        matmul(normed, &m->gate_up[l], hidden, B, C, 2 * F);
        for (int b = 0; b < B; b++) {
            for (int i = 0; i < F; i++) {
                const float gate = hidden[(long)b * 2 * F + i], up = hidden[(long)b * 2 * F + F + i];
                act[(long)b * F + i] = gate / (1.0f + expf(-gate)) * up;
            }
        }
        matmul_add(act, &m->down[l], x, B, F, C);
    }
    for (int b = 0; b < B; b++) unit(x + b * C, normed + b * C, C, m->floor);
    matmul(normed, &m->head, logits, B, C, m->vocab);
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
