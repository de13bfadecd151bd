/*
 * moe_sft.h — C ABI of moe_sft: LoRA training on the routed experts of a Mixture-of-Experts layer, on the CPU.
 *
 * The layer computes, per token t with routing (expert_ids[t, j], routing_weights[t, j]), j < top_k:
 *
 *   g = x Wg^T + s (x Ag^T) Bg^T      u = x Wu^T + s (x Au^T) Bu^T      h = silu(g) * u
 *   y = h Wd^T + s (h Ad^T) Bd^T      out[t] = sum_j routing_weights[t, j] * y_{expert_ids[t, j]}(x_t)
 *
 * with s = lora_alpha / lora_rank (the activation may instead be gpt-oss's clamped SwiGLU, and the projections
 * may have frozen biases: see moe_sft_activation and the config's bias fields). Backward returns grad_input,
 * grad_routing_weights and the f32 grads of the six LoRA matrices; base weights are frozen.
 *
 * Data contract (row-major, HF nn.Linear convention [out, in]):
 *   gate_proj, up_proj  [E, I, H] bf16          down_proj            [E, H, I] bf16
 *     (or quantized: see moe_sft_weight_format; LoRA always trains on top of the frozen base weights)
 *   gate_a, up_a        [E, r, H] bf16|f32      gate_b, up_b         [E, I, r] bf16|f32
 *   down_a              [E, r, I] bf16|f32      down_b               [E, H, r] bf16|f32
 *   LoRA grads: same shapes, f32                input/output/grad_output/grad_input [T, H] bf16
 *   expert_ids [T, k] int64 (-1 = no expert)    routing_weights, grad_routing_weights [T, k] f32
 * bf16 crosses the ABI as raw 16-bit words (uint16_t); accumulation is always f32.
 *
 * Ownership: the caller owns every buffer it passes. Base weights are packed into the layer by
 * moe_sft_create (the caller's arrays may be freed afterwards). LoRA arrays are NOT copied: the layer reads
 * them at every call, so an optimizer that updates them in place needs no re-binding.
 *
 * Errors: every call returns a status; nothing aborts, exits or prints. On any error, no output buffer is
 * written and the layer's forward cache is as it was before the call. moe_sft_last_error() gives a message
 * naming the argument, index and value at fault.
 *
 * Threads: all functions may be called from any thread. Compute calls (forward, backward) of all layers in
 * the process run one at a time on a shared worker pool and scratch arena: two threads driving two layers
 * get the same results as running them one after the other. Calls on one layer from several threads are
 * serialized by the layer's own lock (update_lora, forward, backward, cache_depth, discard_saved are each
 * atomic), so the layer stays consistent; which saved forward a backward consumes (LIFO) then depends on the
 * order the calls took, which is the caller's to arrange. destroy must not race with any other call on that layer.
 *
 * The block between the CDEF markers is plain C declarations with no preprocessor lines, so that cffi can
 * read it with ffi.cdef() as is. Exported symbols are marked with the visibility pragma around it.
 */
#ifndef MOE_SFT_H
#define MOE_SFT_H

#include <stddef.h>
#include <stdint.h>

#define MOE_SFT_VERSION_MAJOR 0
#define MOE_SFT_VERSION_MINOR 4
#define MOE_SFT_VERSION_PATCH 0
/* major * 10000 + minor * 100 + patch; compare with moe_sft_version() to detect a header/library mismatch */
#define MOE_SFT_VERSION_NUMBER (MOE_SFT_VERSION_MAJOR * 10000 + MOE_SFT_VERSION_MINOR * 100 + MOE_SFT_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

/* MOE_SFT_CDEF_BEGIN */

typedef struct moe_sft_layer moe_sft_layer;

typedef enum moe_sft_status {
  MOE_SFT_OK = 0,
  MOE_SFT_ERR_INVALID_ARGUMENT, /* a null pointer, a shape, an id, a dtype: the message names it */
  MOE_SFT_ERR_OUT_OF_MEMORY,
  MOE_SFT_ERR_CACHE_FULL,       /* forward(save_for_backward=1) with max_cache_depth forwards pending */
  MOE_SFT_ERR_CACHE_EMPTY,      /* backward without a pending saved forward */
  MOE_SFT_ERR_NON_FINITE,
  MOE_SFT_ERR_UNSUPPORTED,      /* a valid request this build or machine cannot serve */
  MOE_SFT_ERR_INTERNAL
} moe_sft_status;

typedef enum moe_sft_dtype { MOE_SFT_DTYPE_BF16 = 0, MOE_SFT_DTYPE_F32 = 1 } moe_sft_dtype;

/* How the layer stores its frozen base weights. For one projection W [N, K] of one expert (gate/up:
 * N = I, K = H; down: N = H, K = I), with g = group_size and q the stored integers:
 *
 *   BF16      W as given.
 *   INT8      W[n, k] = q[n, k] * scale[n]                      q int8, scale f32, per output channel.
 *   INT4_AWQ  W[n, k] = (q[n, k] - zero[n, k/g]) * scale[n, k/g]    q, zero in [0, 15], scale f32.
 *   INT4_K2   W[n, k] = q[n, k] * scale[n, k/g]                 q in [-8, 7], scale bf16 (symmetric; Kimi-K2).
 *   FP8_E4M3_BLOCK  W[n, k] = e4m3(q[n, k]) * scale_inv[n/bn, k/bk]    (DeepSeek-V3/R1, Qwen3-FP8)
 *             q an e4m3fn byte (sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities;
 *             S.1111.111 is NaN; largest 448; subnormals 2^-6 * m/8); scale_inv f32 or bf16 (scale_dtype) per
 *             block of bn x bk = block_rows x block_cols (the checkpoint's quantization_config
 *             .weight_block_size, [128, 128] in every published model); the last block of a row or column
 *             may be partial.
 *   MXFP4     W[n, k] = e2m1(q[n, k]) * 2^(scale[n, k/32] - 127)   (OCP microscaling; gpt-oss)
 *             q an e2m1 nibble (sign in bit 3; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), scale an e8m0 byte
 *             (255 is NaN); group_size 32, K % 32 == 0.
 *
 * Made from bf16 at create (prequantized = 0: gate_proj/up_proj/down_proj are bf16 as above and the
 * layer quantizes them exactly as moe_sft_quantize does) for INT8 and INT4_AWQ; from the caller's
 * quantized arrays (prequantized = 1) for INT8, INT4_AWQ and INT4_K2. Pre-quantized layouts, per projection,
 * all experts stacked in front ([E, ...]); scale and zero pointers in the config's gate_/up_/down_ fields:
 *
 *   INT8      weights int8 [E, N, K]                 scale f32 [E, N]
 *   INT4_AWQ  weights uint8 [E, N, K/2]: q[n, k] in the low nibble of byte k/2 for even k, the high
 *             nibble for odd k (K even)              scale f32 [E, N, K/g]    zero uint8 [E, N, K/g]
 *   INT4_K2   weights int32 [E, N, K/8], the compressed-tensors "pack-quantized" layout
 *             (weight_packed): q[n, k] + 8 in bits 4 (k % 8) .. 4 (k % 8) + 3 of word k/8 (K % 8 == 0)
 *                                                    scale bf16 [E, N, K/g]   (weight_scale)
 *   FP8_E4M3_BLOCK  weights uint8 [E, N, K] (weight)      scale f32 or bf16 [E, ceil(N/bn), ceil(K/bk)]
 *                                                                             (weight_scale_inv)
 *   MXFP4     weights uint8 [E, N, K/2] (= gpt-oss's *_blocks [E, N, K/32, 16]): q[n, k] in the low nibble of
 *             byte k/2 for even k, the high nibble for odd k     scale uint8 [E, N, K/32] (*_scales)
 *
 * FP8_E4M3_BLOCK: block_rows, block_cols >= 1 (block_cols even), group_size 0; parts split I on whole blocks
 * (tp_count <= ceil(I / lcm(block_rows, block_cols))). MXFP4: group_size 32. Both are made from bf16 at
 * create as moe_sft_quantize_blocks does, or taken pre-quantized; their scales are taken as they are without
 * check_finite (a NaN code, a non-finite or zero FP8 scale, an e8m0 255 make NaN/Inf/0 weights); with
 * check_finite, create refuses them naming the projection, expert, row and column. Every family decodes
 * them through one shared decoder into bf16 blocks (exact for every e4m3 code and every e2m1 value times a
 * power of two in bf16's range; code * scale_inv is rounded to bf16 once).
 *
 * For the INT formats, g must be even and divide K of every projection (H and I), and tp_count <= I / g
 * (parts split I on whole groups). Pre-quantized scales are taken as they are (zero and negative included;
 * NaN/Inf are refused only with check_finite); AWQ zero points above 15 are refused. A config the formats do not
 * allow (K2 from bf16, a missing or extra scale/zero pointer, group_size 0, ...) is
 * MOE_SFT_ERR_INVALID_ARGUMENT naming the field. Backward reads the stored integers as forward does: no
 * bf16 copy of a quantized weight is ever made. */
typedef enum moe_sft_weight_format {
  MOE_SFT_WEIGHT_BF16 = 0,
  MOE_SFT_WEIGHT_INT8 = 1,
  MOE_SFT_WEIGHT_INT4_AWQ = 2,
  MOE_SFT_WEIGHT_INT4_K2 = 3,
  MOE_SFT_WEIGHT_FP8_E4M3_BLOCK = 4,
  MOE_SFT_WEIGHT_MXFP4 = 5
} moe_sft_weight_format;

/* The activation between the gate/up projections and the down projection (version 0.4). With g and u the gate and
 * up projections' outputs (their biases and LoRA terms included):
 *   SILU             h = silu(g) * u                                              (Qwen, DeepSeek, Mixtral, ...)
 *   SWIGLU_CLAMPED   gate = min(g, limit), up = clamp(u, -limit, limit),
 *                    h = (up + 1) * gate * sigmoid(alpha * gate)                  (gpt-oss)
 *                    with alpha = swiglu_alpha (gpt-oss: 1.702) and limit = swiglu_limit (gpt-oss: 7.0). Backward:
 *                    d/dg = 0 where g > limit, d/du = 0 where u > limit or u < -limit; at equality the gradient
 *                    passes, as torch.clamp's backward does. A NaN g or u stays NaN (as torch.clamp). */
typedef enum moe_sft_activation {
  MOE_SFT_ACTIVATION_SILU = 0,
  MOE_SFT_ACTIVATION_SWIGLU_CLAMPED = 1
} moe_sft_activation;

typedef struct moe_sft_config {
  size_t struct_size;        /* = sizeof(moe_sft_config); set by moe_sft_config_init, lets fields be added */
  int32_t expert_num;        /* E >= 1 */
  int32_t hidden_size;       /* H >= 1 */
  int32_t intermediate_size; /* I >= 1 */
  int32_t lora_rank;         /* r >= 0; 0 = no adapters (binding any is then refused) */
  float lora_alpha;          /* LoRA scale s = lora_alpha / lora_rank */
  int32_t max_cache_depth;   /* >= 0: forwards with save_for_backward=1 that may await backward */
  int32_t num_threads;       /* 0 = all cores */
  int32_t tp_count;          /* 1 <= tp_count <= I: parts the intermediate dim is split into, each with its own
                                packed slice (NUMA node p mod nodes); results equal tp_count = 1 */
  const void *gate_proj;     /* [E, I, H] bf16 (or pre-quantized, see moe_sft_weight_format), packed at create */
  const void *up_proj;       /* [E, I, H] bf16 (or pre-quantized), packed at create */
  const void *down_proj;     /* [E, H, I] bf16 (or pre-quantized), packed at create */
  /* Fields below were added after the first version; a caller's shorter struct_size keeps their defaults. */
  int32_t check_finite;      /* != 0: stop at the first NaN/Inf with MOE_SFT_ERR_NON_FINITE, naming the stage,
                                tensor, index and value (see moe_sft_forward/backward). Default: the environment
                                variable MOE_SFT_CHECK_FINITE=1 turns it on for the process. Base weights are
                                checked once, at create. Off costs nothing. */
  /* Quantized base weights (version 0.2). All zero: bf16 weights, as before. */
  moe_sft_weight_format weight_format; /* how the layer stores the base weights */
  int32_t group_size;        /* INT4_AWQ, INT4_K2: elements along K sharing a scale (AWQ's usual 128, K2's 32);
                                must be 0 for BF16 and INT8 */
  int32_t prequantized;      /* 0: gate_proj/up_proj/down_proj are bf16 (and every scale/zero pointer NULL);
                                1: they hold weight_format's quantized layout, with the scales (and zeros) below */
  const void *gate_scale, *up_scale, *down_scale; /* pre-quantized scales: f32 (INT8, INT4_AWQ), bf16 (INT4_K2),
                                f32 or bf16 (FP8_E4M3_BLOCK: scale_dtype), e8m0 bytes (MXFP4) */
  const uint8_t *gate_zero, *up_zero, *down_zero; /* pre-quantized INT4_AWQ zero points; NULL for other formats */
  /* Block-scaled FP8 (version 0.4). */
  int32_t block_rows;        /* FP8_E4M3_BLOCK: rows (along N) per scale, the checkpoint's weight_block_size[0];
                                must be 0 for other formats */
  int32_t block_cols;        /* FP8_E4M3_BLOCK: columns (along K) per scale, weight_block_size[1]; even;
                                must be 0 for other formats */
  moe_sft_dtype scale_dtype; /* FP8_E4M3_BLOCK's pre-quantized scale_inv: F32 (default) or BF16; must stay F32
                                for other formats (their scale types are fixed) */
  /* Activation and frozen biases (version 0.4). moe_sft_config_init's defaults: SILU and no biases, as before. */
  moe_sft_activation activation; /* see moe_sft_activation */
  float swiglu_alpha;        /* SWIGLU_CLAMPED's alpha: finite and > 0; default 1.702. Not read with SILU. */
  float swiglu_limit;        /* SWIGLU_CLAMPED's limit: finite and > 0; default 7.0. Not read with SILU. */
  /* Optional biases, f32, each NULL (none) or all experts' stacked; copied at create (frozen: no grads), with
   * any activation: g = x Wg^T + gate_bias[e] + LoRA, u = x Wu^T + up_bias[e] + LoRA, y = h Wd^T + down_bias[e] +
   * LoRA, and the routing weight multiplies y with its bias (gpt-oss's order), so grad_routing_weights includes
   * <grad_output, down_bias[e]>. gpt-oss's gate_up_proj_bias [E, 2I] is interleaved: gate_bias = its even
   * columns, up_bias its odd ones. With check_finite a NaN/Inf bias is refused at create (as base weights). */
  const float *gate_bias;    /* [E, I] */
  const float *up_bias;      /* [E, I] */
  const float *down_bias;    /* [E, H] */
} moe_sft_config;

/* The six LoRA arrays of all experts, one dtype for all six. Kept by pointer, read at every call. */
typedef struct moe_sft_lora {
  moe_sft_dtype dtype;
  const void *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
} moe_sft_lora;

/* Grads of the six LoRA arrays, f32, same shapes as the LoRA arrays. */
typedef struct moe_sft_lora_grads {
  float *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
} moe_sft_lora_grads;

/* Fills cfg with defaults (lora_alpha 32, lora_rank 16, max_cache_depth 1, num_threads 0, tp_count 1,
 * check_finite from MOE_SFT_CHECK_FINITE, weight_format BF16, activation SILU, swiglu_alpha 1.702, swiglu_limit 7,
 * everything else 0 / NULL) and sets struct_size. Thread-safe. */
void moe_sft_config_init(moe_sft_config *cfg);

/* Validates cfg, packs (and, from bf16, quantizes) the base weights, and returns a new layer in *out (set
 * to NULL on error). Resident size: about the stored format's bytes (bf16 2, int8 1, int4 0.5 per weight, plus
 * the scales), never a second copy. */
moe_sft_status moe_sft_create(const moe_sft_config *cfg, moe_sft_layer **out);

/* Frees the layer, its packed weights and pending forward caches. NULL is fine. */
void moe_sft_destroy(moe_sft_layer *layer);

/* Binds the caller's six LoRA arrays (zero-copy). Rebinding replaces the previous binding; lora = NULL
 * unbinds them (version 0.3; on a lora_rank = 0 layer it does nothing). A layer with lora_rank > 0 and no
 * adapters bound runs the base layer only, as lora_rank = 0 does (evaluation, a teacher's output); each saved
 * forward remembers whether it ran with adapters (see moe_sft_backward). Atomic on one layer. Errors: a
 * non-NULL lora with a bad dtype or a NULL or misaligned array, or any lora on a lora_rank = 0 layer
 * (MOE_SFT_ERR_INVALID_ARGUMENT); the binding is then as it was. */
moe_sft_status moe_sft_update_lora(moe_sft_layer *layer, const moe_sft_lora *lora);

/* out[qlen, H] = the layer applied to input[qlen, H]. qlen >= 0 has no upper bound; top_k >= 1.
 * expert_ids[t, j] in [-1, E): -1 contributes nothing, a repeated id contributes twice.
 * save_for_backward != 0 pushes what backward needs onto the layer's LIFO cache.
 * With check_finite, these are checked in order, stopping at the first NaN/Inf (MOE_SFT_ERR_NON_FINITE):
 * 1 input, 2 routing weights (of slots with an expert), 3 LoRA weights, 4 gate/up projection output,
 * 5 activation output, 6 down projection output, 7 layer output. Nothing is written on that error. */
moe_sft_status moe_sft_forward(moe_sft_layer *layer, int64_t qlen, int32_t top_k,
                               const int64_t *expert_ids, const float *routing_weights,
                               const uint16_t *input, uint16_t *output, int32_t save_for_backward);

/* Backward of the most recent saved forward, which it consumes (only on success).
 * A forward that ran with adapters needs adapters bound at backward (the LoRA arrays bound now are read):
 * if they were unbound since, MOE_SFT_ERR_INVALID_ARGUMENT and nothing is written (bind them again, or
 * drop the forward with moe_sft_discard_saved). A forward that ran base-only (no adapters bound) gives the
 * base layer's grad_input and grad_routing_weights, whatever is bound now; its LoRA grads are zeros
 * (overwritten with zeros, or left as they are with accumulate != 0).
 * With check_finite, checked in order: 1 grad_output, 2 grad of the intermediate (gate/up projection grads),
 * 3 grad_input, 4 grad_routing_weights, 5 the LoRA grads computed by this call (before accumulating).
 * grad_output, grad_input: [qlen, H] bf16 of that forward. grad_routing_weights [qlen, top_k] f32 or NULL.
 * grads: LoRA grads or NULL (skip them); accumulate != 0 adds into them instead of overwriting.
 * grad_input and grad_routing_weights are always overwritten; -1 slots get 0. */
moe_sft_status moe_sft_backward(moe_sft_layer *layer, const uint16_t *grad_output, uint16_t *grad_input,
                                float *grad_routing_weights, const moe_sft_lora_grads *grads,
                                int32_t accumulate);

/* Number of saved forwards awaiting backward, in *depth. */
moe_sft_status moe_sft_cache_depth(const moe_sft_layer *layer, int32_t *depth);

/* Drops the n most recent saved forwards (the top of the LIFO cache first) without their backward
 * (version 0.3): for a saved forward whose backward will not run, e.g. after an exception between forward
 * and backward, a backward stopped by MOE_SFT_ERR_NON_FINITE, or an evaluation forward saved by mistake.
 * 0 <= n <= depth (moe_sft_cache_depth); otherwise MOE_SFT_ERR_INVALID_ARGUMENT naming n and the depth,
 * and nothing is dropped. Atomic on one layer, as backward. */
moe_sft_status moe_sft_discard_saved(moe_sft_layer *layer, int32_t n);

/* Name of the kernel family the layer runs on ("generic", ...); chosen at create from the CPU, or forced
 * with the environment variable MOE_SFT_ISA. Static storage; NULL layer gives NULL. */
const char *moe_sft_layer_isa(const moe_sft_layer *layer);

/* Name of the kernel family new layers get on this machine now (MOE_SFT_ISA honoured), in *name: "amx",
 * "avx512_fma", "avx512_bf16", "amx-emulated" or "generic" (static storage). MOE_SFT_ERR_UNSUPPORTED when MOE_SFT_ISA
 * names a family that cannot run here, MOE_SFT_ERR_INVALID_ARGUMENT when it names none. MOE_SFT_MAX_ISA=NAME caps
 * the choice: the families listed above NAME in this order (amx, avx512_fma, avx512_bf16, amx-emulated, generic)
 * count as unable to run here, for the automatic choice and for MOE_SFT_ISA alike. Thread-safe. */
moe_sft_status moe_sft_isa(const char **name);

/* Static string for a status ("MOE_SFT_OK", ...); unknown values give "unknown status". */
const char *moe_sft_status_string(moe_sft_status status);

/* Message of this thread's most recent call: what failed, naming argument, index and value; "" after a
 * success. Valid until this thread's next call into the library. */
const char *moe_sft_last_error(void);

/* Quantizes one bf16 matrix w [rows, cols] (row-major, rows = output channels) into weight_format's
 * pre-quantized layout (see moe_sft_weight_format), exactly as moe_sft_create does from bf16:
 *   INT8      scale[n] = max_k |w[n, k]| / 127 (1 for an all-zero row); q = clamp(round_half_even(w / scale),
 *             -127, 127)
 *   INT4_AWQ  per group of group_size: lo = min(0, min w), hi = max(0, max w), scale = (hi - lo) / 15
 *             (1 for an all-zero group), zero = round_half_even(-lo / scale), q = clamp(round_half_even(w / scale)
 *             + zero, 0, 15)
 * weights: int8 [rows, cols] or uint8 [rows, cols/2]; scale: f32 [rows] or [rows, cols/group_size];
 * zero: uint8 [rows, cols/group_size] for INT4_AWQ, NULL otherwise; group_size even, dividing cols (INT4_AWQ)
 * or 0 (INT8). INT4_K2 cannot be made from bf16
 * (MOE_SFT_ERR_UNSUPPORTED: K2 checkpoints come quantized); BF16 is not a quantized format. w must be
 * finite. Stateless and thread-safe; nothing is written on error. */
moe_sft_status moe_sft_quantize(moe_sft_weight_format weight_format, int32_t group_size, int64_t rows, int64_t cols,
                                const uint16_t *w, void *weights, float *scale, uint8_t *zero);

/* Quantizes one bf16 matrix w [rows, cols] into FP8_E4M3_BLOCK or MXFP4's pre-quantized layout (see
 * moe_sft_weight_format), exactly as moe_sft_create does from bf16 (version 0.4):
 *   FP8_E4M3_BLOCK  per block of block_rows x block_cols (the last ones partial): scale_inv = amax(|block|) / 448
 *             (1 for an all-zero block), stored as scale_dtype (F32 or BF16); q = e4m3(w / stored scale_inv),
 *             rounded to nearest even, saturating at +-448. weights uint8 [rows, cols]; scale
 *             [ceil(rows/block_rows), ceil(cols/block_cols)] of scale_dtype.
 *   MXFP4     block_rows 1, block_cols 32, cols % 32 == 0 (scale_dtype is not read: the scales are e8m0 bytes):
 *             per group of 32, e = clamp(floor(log2(amax)) - 2, -127, 127) (0 for an all-zero group), scale byte
 *             e + 127, q = e2m1(w / 2^e) rounded to nearest even, saturating at +-6. weights uint8
 *             [rows, cols/2] (low nibble first); scale uint8 [rows, cols/32].
 * w must be finite. Stateless and thread-safe; nothing is written on error. */
moe_sft_status moe_sft_quantize_blocks(moe_sft_weight_format weight_format, int32_t block_rows, int32_t block_cols,
                                       moe_sft_dtype scale_dtype, int64_t rows, int64_t cols, const uint16_t *w,
                                       uint8_t *weights, void *scale);

/* Name of a weight format ("bf16", "int8", "int4_awq", "int4_k2", "fp8_e4m3_block", "mxfp4"); NULL for an
 * unknown value. */
const char *moe_sft_weight_format_name(moe_sft_weight_format weight_format);

/* Name of an activation ("silu", "swiglu_clamped"); NULL for an unknown value. Static storage, thread-safe
 * (version 0.4). */
const char *moe_sft_activation_name(moe_sft_activation activation);

/* Name of a dtype ("bf16", "f32"); NULL for an unknown value. Static storage, thread-safe (version 0.3). */
const char *moe_sft_dtype_name(moe_sft_dtype dtype);

/* MOE_SFT_VERSION_NUMBER of the library actually loaded. */
uint32_t moe_sft_version(void);

/* Scoring function of the router: softmax over the experts of a row, or a sigmoid of each logit. */
typedef enum moe_sft_scoring { MOE_SFT_SCORING_SOFTMAX = 0, MOE_SFT_SCORING_SIGMOID = 1 } moe_sft_scoring;

/* Name of a scoring function ("softmax", "sigmoid"); NULL for an unknown value. Static storage, thread-safe
 * (version 0.3). */
const char *moe_sft_scoring_name(moe_sft_scoring scoring);

/* Top-k router that no NaN or Inf can break: from gate logits, the experts of every token and their routing
 * weights, ready for moe_sft_forward. Per row t (scores computed in double):
 *   scores[e]           = softmax(logits[t, :])[e]  or  sigmoid(logits[t, e])
 *   expert_ids[t, :]    = the top_k experts by scores[e] + correction_bias[e], best first, ties to the lower id
 *   routing_weights[t, j] = scores[expert_ids[t, j]] (the bias only selects), divided by the sum over the row's
 *                         top_k selected scores when renormalize != 0
 * Every row, whatever it holds, gets top_k distinct ids in [0, expert_num) and weights in [0, 1]; rows
 * without NaN or Inf are exactly the formulas above. The rules for the others:
 *   - a NaN logit ranks below every non-NaN one, whatever the bias (NaNs among themselves by id) and scores 0;
 *   - softmax: NaNs are left out of the softmax. If the largest other logit is +Inf, the +Inf entries share
 *     the mass equally and the rest score 0; if all the others are -Inf, they share it equally. A row of NaNs
 *     only is scored as a row of equal logits (1/expert_num each) and selects ids 0 .. top_k-1;
 *   - sigmoid: +Inf scores 1, -Inf scores 0, NaN scores 0;
 *   - renormalize: when the selected scores sum to 0, every weight is 1/top_k.
 * qlen >= 0 rows; expert_num >= 1; 1 <= top_k <= expert_num.
 * logits_dtype: MOE_SFT_DTYPE_F32 or MOE_SFT_DTYPE_BF16 (16-bit words); logits [qlen, expert_num] of it.
 * scoring: MOE_SFT_SCORING_SOFTMAX or MOE_SFT_SCORING_SIGMOID.
 * correction_bias: [expert_num] f32, all finite, or NULL for none; added to the scores for selection only
 *   (DeepSeek-V3's e_score_correction_bias). Group-limited selection and a routed scaling factor are the
 *   caller's (scale the weights after the call).
 * expert_ids: [qlen, top_k] int64 out. routing_weights: [qlen, top_k] f32 out.
 * With MOE_SFT_CHECK_FINITE=1 in the environment (check_finite's process default), a NaN/Inf logit is
 * reported instead: MOE_SFT_ERR_NON_FINITE naming the token, expert and value, nothing written.
 * Stateless: runs on the calling thread, any number of calls at once, independent of every layer. */
moe_sft_status moe_sft_route(int64_t qlen, int32_t expert_num, int32_t top_k, moe_sft_dtype logits_dtype,
                             const void *logits, moe_sft_scoring scoring, int32_t renormalize,
                             const float *correction_bias, int64_t *expert_ids, float *routing_weights);

/* Backward of moe_sft_route: grad_logits[t, e] = d(sum_j grad_routing_weights[t, j] * routing_weights[t, j])
 * / d logits[t, e], for the weights moe_sft_route gives the selection expert_ids (held fixed) under the same
 * rules. Unselected experts get the softmax cross terms (exactly 0 when renormalize != 0: the renormalized
 * weights are then a softmax over the selected logits alone). A non-finite logit gets 0, and so does every
 * logit of a row whose weights the rules make constant (an +Inf in a softmax row, a renormalized row whose
 * selected scores sum to 0).
 * qlen, expert_num, top_k, logits_dtype, logits, scoring, renormalize: as given to moe_sft_route.
 * expert_ids: [qlen, top_k] int64, each in [0, expert_num); a repeated id counts twice in the renormalizing sum.
 * grad_routing_weights: [qlen, top_k] f32. grad_logits: [qlen, expert_num] f32 out, overwritten.
 * Stateless, as moe_sft_route. */
moe_sft_status moe_sft_route_backward(int64_t qlen, int32_t expert_num, int32_t top_k, moe_sft_dtype logits_dtype,
                                      const void *logits, moe_sft_scoring scoring, int32_t renormalize,
                                      const int64_t *expert_ids, const float *grad_routing_weights,
                                      float *grad_logits);

/* ---- bf16 arrays (version 0.3) ----------------------------------------------------------------------------
 * So that a C program needs nothing but this header to make the layer's bf16 inputs or read its outputs.
 * bf16 is the upper half of an IEEE f32: sign, 8 exponent bits, 7 mantissa bits. */

/* dst[i] = src[i] rounded to bf16, to nearest with ties to even, for i < n. Inf stays Inf, finite values
 * beyond bf16's largest round to Inf as IEEE rounding does, subnormals round like any other value, and
 * every NaN becomes the quiet NaN 0x7fc0 with its sign (0xffc0 for a negative one), as ml_dtypes and Eigen
 * give. n >= 0 (0 does nothing); src and dst must not overlap. Runs on the calling thread; stateless and
 * thread-safe. Errors (MOE_SFT_ERR_INVALID_ARGUMENT, nothing written): n < 0, a NULL or misaligned array
 * with n > 0, overlapping arrays. */
moe_sft_status moe_sft_bf16_from_f32(const float *src, uint16_t *dst, int64_t n);

/* dst[i] = src[i] widened to f32 (exact: every bf16 is an f32; NaN payloads are kept), for i < n. Same rules
 * for n, the arrays, threads and errors as moe_sft_bf16_from_f32. */
moe_sft_status moe_sft_bf16_to_f32(const uint16_t *src, float *dst, int64_t n);

/* ---- expert-parallel exchange plan (version 0.3) ----------------------------------------------------------
 * The bookkeeping of expert parallelism, for a host that moves rows between ranks with its own transport
 * (MPI_Alltoallv, torch.distributed, ...); the library itself never communicates. Each expert e is owned by
 * one rank, placement[e]; a rank's (token, slot) pairs travel as rows to the ranks owning their experts.
 *
 * Send plan of this rank's routing expert_ids [qlen, top_k] (int64, -1 = no expert, which is never sent):
 *   send_counts[r]   rows for rank r                         [world] int64 out
 *   send_offsets[r]  first row of rank r's block              [world] int64 out (exclusive prefix sum)
 *   send_pairs[i]    flat pair index t * top_k + j of send row i, for i < *send_rows; -1 for the rest
 *                                                             [qlen * top_k] int64 out
 *   *send_rows       rows in all (pairs whose id is not -1)   int64 out
 * Rows are ordered by (owner rank, expert id, pair index): each rank's block is sorted by expert, and each
 * expert's rows are in token order. A send buffer row i holds x[send_pairs[i] / top_k] (and, for the owner,
 * the id and routing weight of that pair); results returned in the same order are combined with
 * out[send_pairs[i] / top_k] += result row i. The receive side needs only the counts each rank sends it
 * (one all-to-all of send_counts); it runs its own layer over its experts' rows, in the order received.
 * placement: [expert_num] int32, each in [0, world). qlen >= 0; top_k >= 1; expert_num >= 1; world >= 1.
 * Errors (MOE_SFT_ERR_INVALID_ARGUMENT naming the argument, index and value; nothing written): a count out of
 * range, a NULL or misaligned array (NULL allowed for an empty one), placement[e] outside [0, world), an id
 * outside [-1, expert_num). Stateless: runs on the calling thread, any number of calls at once. */
moe_sft_status moe_sft_plan_exchange(int64_t qlen, int32_t top_k, const int64_t *expert_ids, int32_t expert_num,
                                     const int32_t *placement, int32_t world, int64_t *send_counts,
                                     int64_t *send_offsets, int64_t *send_pairs, int64_t *send_rows);

/* ---- AdamW (version 0.3) -----------------------------------------------------------------------------------
 * torch.optim.AdamW's update over a fixed set of parameter tensors (any number: the LoRA arrays of every layer
 * of a model in one optimizer, so that clipping sees the global norm), with torch.nn.utils.clip_grad_norm_'s
 * clipping and a non-finite guard. A parameter is a flat array (f32 or bf16) the optimizer updates in place;
 * it knows nothing of layers, so the arrays bound to a layer with moe_sft_update_lora are trained without
 * re-binding. Per step t (1, 2, ... counted by the optimizer), per element, with g the grad times the
 * clipping factor:
 *
 *   p = p * (1 - lr * weight_decay)                     (decoupled weight decay)
 *   m = beta1 * m + (1 - beta1) * g                     (as torch's lerp: m + (1 - beta1) (g - m))
 *   v = beta2 * v + (1 - beta2) * g * g
 *   p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 *
 * in f32 arithmetic, in torch's order of operations, with each scalar rounded to f32 as torch rounds a Python
 * float for an f32 tensor, and no fused multiply-add, so every machine gives the same bits. torch's own CPU
 * kernels fuse some of these products (its vectorized lerp), so the two agree to f32 rounding (1.2e-7 after 20
 * steps at lr 1e-2 in the tests), not bit for bit.
 *
 * State: f32 moments m and v for every element (zero at create) and, for a bf16 parameter, an f32 master copy
 * (the parameter's value at create). A bf16 parameter is updated in its master and then overwritten with the
 * master rounded to nearest even. Why: bf16 keeps 8 bits of mantissa, so an update smaller than half a unit
 * in the last place (|update| < 2^-9 |p|, the usual size late in training at small lr) would round back to
 * the old value every step and the weight would stop moving; the master accumulates such updates. The master
 * is the value of record: to change a bf16 parameter's value, write its master (moe_sft_adamw_state); the
 * next step overwrites the bf16 array. Memory: 8 bytes per element, 12 for a bf16 one.
 *
 * Clipping (max_grad_norm > 0): norm = sqrt(sum of g^2 over all elements of all parameters), computed in
 * double from per-chunk partial sums added in a fixed order (the same on any number of threads); when
 * coef = max_grad_norm / (norm + 1e-6) < 1, every grad is read as g * (float)coef. The caller's grad arrays
 * are never written.
 *
 * Non-finite guard: a step whose grads hold a NaN or Inf anywhere changes nothing (parameters, masters,
 * moments and step count stay as they were) and reports the first one (lowest parameter index, then element
 * index) in moe_sft_adamw_report with skipped = 1. The call still returns MOE_SFT_OK: a skipped step is an
 * outcome of valid input, like a loss spike under mixed precision (torch's GradScaler skips such steps
 * silently too), not a mistake in the call, and the caller decides what to do (lower the lr, skip the batch,
 * stop); check report.skipped.
 *
 * Threads: a step runs on the library's worker pool (num_threads of it), in chunks of 16 Ki elements, and
 * holds the pool for its duration, as a layer's forward and backward do: steps of several optimizers and
 * calls of layers from several threads run one after another. The calls on one optimizer (step, the setters
 * and getters) are each atomic; destroy must not race with any other call on it. The pointers
 * moe_sft_adamw_state returns must not be used while a step on that optimizer runs. */

typedef struct moe_sft_adamw moe_sft_adamw;

typedef struct moe_sft_adamw_config {
  size_t struct_size;    /* = sizeof(moe_sft_adamw_config); set by moe_sft_adamw_config_init */
  double lr;             /* >= 0, finite; default 1e-3 */
  double beta1, beta2;   /* each in [0, 1); defaults 0.9, 0.999 */
  double eps;            /* > 0, finite; default 1e-8 */
  double weight_decay;   /* >= 0, finite; default 0 (torch.optim.AdamW's default is 0.01: set it) */
  double max_grad_norm;  /* >= 0, finite; 0 = no clipping (default) */
  int32_t num_threads;   /* 0 = the worker pool's default (all cores, as a layer's 0); at most 4096 */
} moe_sft_adamw_config;

/* One parameter tensor. */
typedef struct moe_sft_adamw_param {
  const char *name;      /* copied at create, used in reports; NULL names it "params[i]" */
  moe_sft_dtype dtype;   /* MOE_SFT_DTYPE_F32 or MOE_SFT_DTYPE_BF16 (16-bit words) */
  void *data;            /* count elements of dtype, updated in place by every step; the caller keeps it alive
                            until destroy */
  int64_t count;         /* >= 1 elements (a tensor's product of dims) */
} moe_sft_adamw_param;

/* What a step did. The caller sets struct_size = sizeof(moe_sft_adamw_report) before the call; the library
 * writes the fields it knows within struct_size. */
typedef struct moe_sft_adamw_report {
  size_t struct_size;
  double grad_norm;      /* global L2 norm of all grads before clipping (NaN or Inf when skipped) */
  double clip_coef;      /* the factor the grads were scaled by: 1 when not clipped (or skipped) */
  int32_t skipped;       /* 1: a grad was NaN/Inf and the step changed nothing; 0: the step was applied */
  int32_t bad_param;     /* skipped: index of the first parameter with a NaN/Inf grad; else -1 */
  const char *bad_param_name; /* skipped: its name (the optimizer's copy, valid until destroy); else NULL */
  int64_t bad_index;     /* skipped: flat index of the first NaN/Inf element of that grad; else -1 */
  float bad_value;       /* skipped: its value (NaN, Inf or -Inf); else 0 */
  int64_t step;          /* the optimizer's step count after the call */
} moe_sft_adamw_report;

/* Fills cfg with the defaults above and sets struct_size. NULL does nothing. Thread-safe. */
void moe_sft_adamw_config_init(moe_sft_adamw_config *cfg);

/* Creates an optimizer over params[0 .. n_params-1] in *out (set to NULL on error): allocates zeroed moments,
 * copies each bf16 parameter into its f32 master, step count 0. The parameter arrays are read at create and
 * written by every step; the params array itself and the names may be freed after the call.
 * Errors (MOE_SFT_ERR_INVALID_ARGUMENT naming the field, index and value; nothing allocated): cfg, params or
 * out NULL; cfg->struct_size 0 or smaller than this struct (MOE_SFT_ERR_UNSUPPORTED for a larger one whose extra
 * bytes are not all zero: fields this library does not know); a hyperparameter out of its range or not finite;
 * n_params <= 0; a param's dtype unknown, data NULL or misaligned, count <= 0 or above 2^50; two parameters'
 * arrays overlapping. MOE_SFT_ERR_OUT_OF_MEMORY if the state does not fit. */
moe_sft_status moe_sft_adamw_create(const moe_sft_adamw_config *cfg, int32_t n_params,
                                    const moe_sft_adamw_param *params, moe_sft_adamw **out);

/* Frees the optimizer and its state (never the parameters). NULL is fine. */
void moe_sft_adamw_destroy(moe_sft_adamw *opt);

/* One step (see above). grads[i]: f32, params[i].count elements, the gradient of parameter i (read only).
 * report: NULL, or filled as described at moe_sft_adamw_report (also for a skipped step).
 * Errors (MOE_SFT_ERR_INVALID_ARGUMENT naming the argument and index; nothing written, report included): opt
 * or grads NULL, grads[i] NULL or misaligned, a grad array overlapping a parameter or the optimizer's state,
 * report->struct_size smaller than the first version's report. */
moe_sft_status moe_sft_adamw_step(moe_sft_adamw *opt, const float *const *grads, moe_sft_adamw_report *report);

/* The optimizer's hyperparameters and thread count now, in *cfg (struct_size set). */
moe_sft_status moe_sft_adamw_get_config(const moe_sft_adamw *opt, moe_sft_adamw_config *cfg);

/* Replaces all hyperparameters and the thread count (validated as at create; on error nothing changes). The
 * state (moments, masters, step count) is kept: for load_state_dict, or changing betas mid-run. */
moe_sft_status moe_sft_adamw_set_config(moe_sft_adamw *opt, const moe_sft_adamw_config *cfg);

/* Sets the learning rate used from the next step on (lr >= 0, finite): for schedules. */
moe_sft_status moe_sft_adamw_set_lr(moe_sft_adamw *opt, double lr);

/* The step count (steps applied since create or the last set_step; skipped steps do not count). */
moe_sft_status moe_sft_adamw_get_step(const moe_sft_adamw *opt, int64_t *step);

/* Sets the step count (>= 0) the next step's bias correction continues from: for load_state_dict. */
moe_sft_status moe_sft_adamw_set_step(moe_sft_adamw *opt, int64_t step);

/* Number of parameters, in *n_params. */
moe_sft_status moe_sft_adamw_num_params(const moe_sft_adamw *opt, int32_t *n_params);

/* Parameter i as given at create, in *param (name: the optimizer's copy, valid until destroy). */
moe_sft_status moe_sft_adamw_param_info(const moe_sft_adamw *opt, int32_t param_index, moe_sft_adamw_param *param);

/* Pointers into the optimizer's own state of parameter param_index (0 <= param_index < n_params), each
 * params[param_index].count f32 elements, valid until destroy: *m and *v the moments, *master the f32 master
 * of a bf16 parameter (NULL for an f32 one), *step the step count. Any output pointer may be NULL (not
 * wanted). The caller may read them (state_dict) and write them (load_state_dict) between steps, never while
 * a step on this optimizer runs. */
moe_sft_status moe_sft_adamw_state(moe_sft_adamw *opt, int32_t param_index, float **m, float **v, float **master,
                                   int64_t *step);

/* MOE_SFT_CDEF_END */

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif

#endif /* MOE_SFT_H */
