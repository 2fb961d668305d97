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
 * attention over a long cache) when the engine computes in bf16. The cache is a ring: stream
 * position p lives in slot p % context, so past the context each token overwrites the oldest and
 * attends to the newest `context` (model/engine.py says why). tests/test_model.py checks this step
 * against GPT.forward.
 *
 * The file also draws the next token (`draw`, the sampling rule of model/sampling.py) and runs the
 * generation loop a stretch at a time (`decode_tokens`: step, draw, step, ...), so that a token
 * costs no Python at all (benchmarks/NOTES.md, "Decoding a run of tokens in C").
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

/* Scratch memory of one step for B rows, allocated once per call. */
typedef struct {
    float *x, *normed, *qkv, *attended, *hidden, *act, *scores, *rot;
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->x), free(s->normed), free(s->qkv), free(s->attended);
    free(s->hidden), free(s->act), free(s->scores), free(s->rot);
}

static int scratch_alloc(Scratch *s, const Model *m, int B) {
    const int C = m->n_embd, HD = m->n_head * m->head_dim, QKV = HD + 2 * m->n_kv_head * m->head_dim;
    s->x = malloc(sizeof(float) * B * C), s->normed = malloc(sizeof(float) * B * C);
    s->qkv = malloc(sizeof(float) * B * QKV), s->attended = malloc(sizeof(float) * B * HD);
    s->hidden = malloc(sizeof(float) * B * 2 * m->mlp_hidden), s->act = malloc(sizeof(float) * B * m->mlp_hidden);
    s->scores = malloc(sizeof(float) * m->context), s->rot = malloc(sizeof(float) * B * m->head_dim);
    if (s->x && s->normed && s->qkv && s->attended && s->hidden && s->act && s->scores && s->rot) return 0;
    scratch_free(s);
    return -1;
}

/* tokens, positions (B,) -> logits (B, vocab). Writes stream position `length` of keys/values (bf16
 * if kv_bf16, else fp32) into slot length % context and attends to every filled slot, the newest
 * `context` positions; mask (B, mask_len) says which of the first mask_len stream positions
 * (mask_len <= context: the prompt's padding) each row may see (NULL: all), and every later
 * position is seen, including one that has overwritten a masked slot. */
static void forward(const Model *m, Scratch *s, const int64_t *tokens, const int64_t *positions, int B, void *keys,
                    void *values, int kv_bf16, int length, const uint8_t *mask, int mask_len, float *logits) {
    const int C = m->n_embd, H = m->n_head, Hkv = m->n_kv_head, D = m->head_dim, F = m->mlp_hidden;
    const int QKV = (H + 2 * Hkv) * D, half = D / 2;
    const int slot = length % m->context, filled = length < m->context ? length + 1 : m->context;
    const int overwritten = length - m->context; /* slots 0..this hold positions past the first context */
    float *x = s->x, *normed = s->normed, *qkv = s->qkv, *attended = s->attended;
    float *hidden = s->hidden, *act = s->act, *scores = s->scores, *rot = s->rot;
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
                const long at = ((((long)l * B + b) * Hkv + g) * m->context + slot) * D;
                store_cached(keys, at, row + (H + g) * D, D, kv_bf16);
                store_cached(values, at, row + (H + Hkv + g) * D, D, kv_bf16);
            }
            for (int h = 0; h < H; h++) {  /* softmax(q . k_t) weighted sum of v_t; 1/sqrt(D) is in the norms */
                const int g = h / (H / Hkv);
                const float *q = row + h * D;
                const long first = (((long)l * B + b) * Hkv + g) * m->context * D;  /* position 0 of this head */
                float best = -INFINITY, total = 0.0f;
                for (int t = 0; t < filled; t++) {
                    const int seen = !mask || t >= mask_len || t <= overwritten || mask[(long)b * mask_len + t];
                    scores[t] = seen ? dot_cached(q, keys, first + (long)t * D, D, kv_bf16) : -INFINITY;
                    if (scores[t] > best) best = scores[t];
                }
                float *out = attended + ((long)b * H + h) * D;
                memset(out, 0, sizeof(float) * D);
                for (int t = 0; t < filled; t++) {
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
}

static int tokens_in_range(const Model *m, const int64_t *tokens, int B) {
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return 0;
    return 1;
}

/* One step (see forward), mask (B, mask_len) or NULL. Returns 0; -2 if a token, the length or
 * mask_len is out of range (nothing is written); -1 if scratch memory could not be allocated. */
int decode_step(const Model *m, const int64_t *tokens, const int64_t *positions, int B, void *keys, void *values,
                int kv_bf16, int length, const uint8_t *mask, int mask_len, float *logits) {
    if (length < 0 || mask_len < 0 || mask_len > m->context || !tokens_in_range(m, tokens, B)) return -2;
    Scratch s;
    if (scratch_alloc(&s, m, B)) return -1;
    forward(m, &s, tokens, positions, B, keys, values, kv_bf16, length, mask, mask_len, logits);
    scratch_free(&s);
    return 0;
}

/* How the next token is drawn from a row of logits: SamplingConfig (model/sampling.py). */
typedef struct {
    int n;                 /* tokens that may be drawn: the first n logits of a row (the tokenizer's vocabulary) */
    float temperature;     /* 0: greedy */
    int top_k;             /* 0: off */
    float top_p;           /* 1: off */
    const uint8_t *banned; /* (n) 1 for a token never drawn; NULL: none */
} Sampling;

typedef struct {
    float value;
    int index;
} Ranked;

static int by_value_descending(const void *a, const void *b) {
    const float x = ((const Ranked *)a)->value, y = ((const Ranked *)b)->value;
    return (x < y) - (x > y);
}

/* The k-th largest of v (n): a min-heap of the k largest seen so far, whose root is the k-th. */
static float kth_largest(const float *v, int n, int k, float *heap) {
    for (int i = 0; i < n; i++) {
        int at;
        if (i < k) {  /* grow the heap: sift the new value up */
            for (at = i; at > 0 && heap[(at - 1) / 2] > v[i]; at = (at - 1) / 2) heap[at] = heap[(at - 1) / 2];
        } else if (v[i] > heap[0]) {  /* replace the root: sift the new value down */
            for (at = 0; 2 * at + 1 < k;) {
                int child = 2 * at + 1;
                if (child + 1 < k && heap[child + 1] < heap[child]) child++;
                if (heap[child] >= v[i]) break;
                heap[at] = heap[child], at = child;
            }
        } else {
            continue;
        }
        heap[at] = v[i];
    }
    return heap[0];
}

/* Scratch memory of draw for n tokens. */
typedef struct {
    float *weight, *heap;
    Ranked *ranked;
} DrawScratch;

static void draw_scratch_free(DrawScratch *d) { free(d->weight), free(d->heap), free(d->ranked); }

static int draw_scratch_alloc(DrawScratch *d, int n) {
    d->weight = malloc(sizeof(float) * n), d->heap = malloc(sizeof(float) * n), d->ranked = malloc(sizeof(Ranked) * n);
    if (d->weight && d->heap && d->ranked) return 0;
    draw_scratch_free(d);
    return -1;
}

/* The token drawn from one row of logits with u in [0, 1), exactly as the engine's PyTorch sampling
 * does it (reference_draw in model/sampling.py): banned tokens out; the argmax at temperature 0; else
 * logits under the k-th largest out (top-k), tokens past the smallest set whose probability reaches
 * top_p out (top-p), then the inverse CDF of softmax(logits / temperature) at u: the first token
 * whose running sum of probabilities exceeds u. */
static int64_t draw(const float *logits, const Sampling *s, float u, DrawScratch *d) {
    const int n = s->n;
    float *weight = d->weight, best = -INFINITY;
    int argmax = 0;
    for (int i = 0; i < n; i++) {
        weight[i] = s->banned && s->banned[i] ? -INFINITY : logits[i];
        if (weight[i] > best) best = weight[i], argmax = i;
    }
    if (s->temperature == 0.0f || best == -INFINITY) return argmax;
    if (s->top_k > 0 && s->top_k < n) {
        const float kth = kth_largest(weight, n, s->top_k, d->heap);
        for (int i = 0; i < n; i++) weight[i] = weight[i] < kth ? -INFINITY : weight[i];
    }
    for (int i = 0; i < n; i++) weight[i] = expf((weight[i] - best) / s->temperature);  /* -inf -> 0 */
    if (s->top_p < 1.0f) {  /* keep each token whose likelier tokens hold at most top_p of the probability */
        /* A token of weight w has less likely ones holding at most n w, so the likelier ones hold
         * more than top_p of the total when w < (1 - top_p) total / n: only the others are sorted
         * (half that bound, for rounding). Without top-k that is a few hundred tokens, not all. */
        int count = 0;
        float mass = 0.0f, before = 0.0f;
        for (int i = 0; i < n; i++) mass += weight[i];
        const float least = 0.5f * (1.0f - s->top_p) * mass / n;
        for (int i = 0; i < n; i++) {
            if (weight[i] > 0.0f && weight[i] >= least) d->ranked[count++] = (Ranked){weight[i], i};
            else weight[i] = 0.0f;
        }
        qsort(d->ranked, count, sizeof(Ranked), by_value_descending);
        for (int j = 0; j < count; j++) {
            if (before > s->top_p * mass) weight[d->ranked[j].index] = 0.0f;
            before += d->ranked[j].value;
        }
    }
    float total = 0.0f, sum = 0.0f;
    for (int i = 0; i < n; i++) total += weight[i];
    const float target = u * total;
    for (int i = 0; i < n; i++)
        if (weight[i] > 0.0f && (sum += weight[i]) > target) return i;
    for (int i = n - 1; i >= 0; i--)  /* rounding left the sum at or under the target */
        if (weight[i] > 0.0f) return i;
    return argmax;
}

/* The token each row draws next: logits (B, >= s->n), rows `stride` floats apart, u (B,) in [0, 1)
 * -> tokens (B,). Returns 0, or -1 if scratch memory could not be allocated. */
int draw_tokens(const float *logits, int B, long stride, const Sampling *s, const float *u, int64_t *tokens) {
    DrawScratch d;
    if (draw_scratch_alloc(&d, s->n)) return -1;
    for (int b = 0; b < B; b++) tokens[b] = draw(logits + b * stride, s, u[b], &d);
    draw_scratch_free(&d);
    return 0;
}

/* Generation's inner loop, `count` times: a step that feeds each row its last token, then a draw
 * of its next one, which the following step feeds (the engine's Python loop per token, in one call:
 * benchmarks/NOTES.md, "Decoding a run of tokens in C"). last, positions (B,): each row's newest
 * token, not yet in the cache, and its rotary position; `length` positions have entered the cache
 * (the newest `context` of them are in it), the first mask_len of them masked by mask (B, mask_len)
 * (NULL: none). u (count, B) in [0, 1) ->
 * out (count, B). A row is done once it draws a token flagged in stops (vocab; NULL: none); the loop
 * ends early when every row is done (done (B) in and out). Returns the number of tokens drawn per
 * row; -2 if a token, the length or mask_len is out of range; -1 if out of memory. */
int decode_tokens(const Model *m, const Sampling *s, const int64_t *last, const int64_t *positions, int B,
                  void *keys, void *values, int kv_bf16, int length, const uint8_t *mask, int mask_len,
                  const uint8_t *stops, uint8_t *done, int count, const float *u, int64_t *out) {
    if (count < 1 || length < 0 || length > INT32_MAX - count || mask_len < 0 || mask_len > m->context ||
        !tokens_in_range(m, last, B))
        return -2;
    Scratch scratch;
    DrawScratch d;
    int64_t *position = malloc(sizeof(int64_t) * B);
    float *logits = malloc(sizeof(float) * B * m->vocab);
    if (!position || !logits || scratch_alloc(&scratch, m, B)) {
        free(position), free(logits);
        return -1;
    }
    if (draw_scratch_alloc(&d, s->n)) {
        free(position), free(logits), scratch_free(&scratch);
        return -1;
    }
    int drawn = 0;
    for (const int64_t *feed = last; drawn < count; feed = out + (long)(drawn - 1) * B) {
        for (int b = 0; b < B; b++) position[b] = positions[b] + drawn;
        forward(m, &scratch, feed, position, B, keys, values, kv_bf16, length + drawn, mask, mask_len, logits);
        int all_done = 1;
        for (int b = 0; b < B; b++) {
            const int64_t token = draw(logits + (long)b * m->vocab, s, u[(long)drawn * B + b], &d);
            out[(long)drawn * B + b] = token;
            done[b] |= stops && stops[token];
            all_done &= done[b];
        }
        drawn++;
        if (all_done) break;
    }
    free(position), free(logits), scratch_free(&scratch), draw_scratch_free(&d);
    return drawn;
}
