/* train.c: trains LoRA adapters on one MoE layer with nothing but moe_sft.h, the loop a C program runs.
 *
 *   cc -std=c11 examples/train.c $(python -m moe_sft --cflags --libs) -o train && ./train [STEPS]
 *
 * A layer is made from random bf16 base weights (converted with moe_sft_bf16_from_f32). A "teacher" adapter
 * (random, f32) gives the targets: the layer's output on a batch with the teacher bound. The student
 * adapter, in bf16 and initialized as PEFT does (A uniform in +-1/sqrt(in), B zero), is then trained to
 * reproduce them: forward, the mean squared error and its gradient, backward into f32 LoRA grads, and an
 * AdamW step (moe_sft_adamw_step) that updates the six bf16 arrays in place through its f32 masters. The
 * layer reads them in place at the next forward, so nothing is re-bound. Prints the loss at every step and
 * exits 0 when it fell to less than half of where it started (the tests build and run it).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_sft.h"

enum { E = 8, H = 64, I = 48, K = 2, T = 128, R = 8, DEFAULT_STEPS = 30 };

/* Every call returns a status; on error moe_sft_last_error() says what was wrong. */
#define CHECK(call)                                                                                       \
  do {                                                                                                    \
    moe_sft_status status_ = (call);                                                                      \
    if (status_ != MOE_SFT_OK) {                                                                          \
      fprintf(stderr, "train: %s failed: %s: %s\n", #call, moe_sft_status_string(status_), moe_sft_last_error()); \
      exit(1);                                                                                            \
    }                                                                                                     \
  } while (0)

/* ---- small helpers, so that the program needs no library but moe_sft (not even -lm) ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(void) { /* xorshift64*, in [0, 1) */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

static double inv_sqrt(double x) { /* 1 / sqrt(x) for x >= 1 by Newton's method */
  double y = 1.0 / x;
  for (int i = 0; i < 60; ++i) y = y * (1.5 - 0.5 * x * y * y);
  return y;
}

static void *checked_malloc(size_t bytes) {
  void *p = calloc(1, bytes);
  if (!p) {
    fprintf(stderr, "train: out of memory\n");
    exit(1);
  }
  return p;
}

/* n floats uniform in [-bound, bound) */
static float *uniform_f32(size_t n, double bound) {
  float *a = checked_malloc(n * sizeof *a);
  for (size_t i = 0; i < n; ++i) a[i] = (float)((2.0 * uniform() - 1.0) * bound);
  return a;
}

/* the same, as bf16 words */
static uint16_t *uniform_bf16(size_t n, double bound) {
  float *f = uniform_f32(n, bound);
  uint16_t *b = checked_malloc(n * sizeof *b);
  CHECK(moe_sft_bf16_from_f32(f, b, (int64_t)n));
  free(f);
  return b;
}

int main(int argc, char **argv) {
  const int steps = argc > 1 ? atoi(argv[1]) : DEFAULT_STEPS;
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (moe_sft_version() != MOE_SFT_VERSION_NUMBER) {
    fprintf(stderr, "train: header %d, library %u\n", MOE_SFT_VERSION_NUMBER, moe_sft_version());
    return 1;
  }

  /* The layer: random bf16 base weights, [out, in] per expert, scaled as nn.Linear's default init. */
  uint16_t *gate = uniform_bf16((size_t)E * I * H, inv_sqrt(H));
  uint16_t *up = uniform_bf16((size_t)E * I * H, inv_sqrt(H));
  uint16_t *down = uniform_bf16((size_t)E * H * I, inv_sqrt(I));
  moe_sft_config cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = E;
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.lora_rank = R;
  cfg.lora_alpha = 16.0f;
  cfg.gate_proj = gate;
  cfg.up_proj = up;
  cfg.down_proj = down;
  moe_sft_layer *layer;
  CHECK(moe_sft_create(&cfg, &layer));
  free(gate); /* packed into the layer */
  free(up);
  free(down);

  /* One batch: T tokens, each routed to K distinct experts with weight 1/K. */
  uint16_t *x = uniform_bf16((size_t)T * H, 1.0);
  int64_t *ids = checked_malloc((size_t)T * K * sizeof *ids);
  float *weights = checked_malloc((size_t)T * K * sizeof *weights);
  for (int t = 0; t < T; ++t) {
    ids[t * K] = (int64_t)(uniform() * E);
    for (int j = 1; j < K; ++j) ids[t * K + j] = (ids[t * K] + j + (int64_t)(uniform() * (E - K))) % E;
    for (int j = 0; j < K; ++j) weights[t * K + j] = 1.0f / K;
  }

  /* The teacher's adapter (f32) and the targets it gives. */
  const size_t n_ga = (size_t)E * R * H, n_gb = (size_t)E * I * R, n_da = (size_t)E * R * I, n_db = (size_t)E * H * R;
  float *t_arrays[6] = {uniform_f32(n_ga, inv_sqrt(H)), uniform_f32(n_gb, 0.5), uniform_f32(n_ga, inv_sqrt(H)),
                        uniform_f32(n_gb, 0.5),         uniform_f32(n_da, inv_sqrt(I)), uniform_f32(n_db, 0.5)};
  moe_sft_lora teacher = {MOE_SFT_DTYPE_F32, t_arrays[0], t_arrays[1], t_arrays[2], t_arrays[3], t_arrays[4], t_arrays[5]};
  uint16_t *out = checked_malloc((size_t)T * H * sizeof *out);
  float *target = checked_malloc((size_t)T * H * sizeof *target);
  CHECK(moe_sft_update_lora(layer, &teacher));
  CHECK(moe_sft_forward(layer, T, K, ids, weights, x, out, /*save_for_backward=*/0));
  CHECK(moe_sft_bf16_to_f32(out, target, (int64_t)T * H));

  /* The student's adapter, bf16, PEFT's init: A uniform in +-1/sqrt(in) (Kaiming-uniform, a = sqrt(5)), B zero. */
  const char *names[6] = {"gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"};
  const size_t counts[6] = {n_ga, n_gb, n_ga, n_gb, n_da, n_db};
  uint16_t *student[6] = {uniform_bf16(n_ga, inv_sqrt(H)), checked_malloc(n_gb * 2), uniform_bf16(n_ga, inv_sqrt(H)),
                          checked_malloc(n_gb * 2),       uniform_bf16(n_da, inv_sqrt(I)), checked_malloc(n_db * 2)};
  moe_sft_lora lora = {MOE_SFT_DTYPE_BF16, student[0], student[1], student[2], student[3], student[4], student[5]};
  CHECK(moe_sft_update_lora(layer, &lora));

  /* Their f32 grads, and the optimizer over the six arrays. */
  float *grad[6];
  moe_sft_adamw_param params[6];
  for (int i = 0; i < 6; ++i) {
    grad[i] = checked_malloc(counts[i] * sizeof(float));
    params[i].name = names[i];
    params[i].dtype = MOE_SFT_DTYPE_BF16;
    params[i].data = student[i];
    params[i].count = (int64_t)counts[i];
  }
  moe_sft_lora_grads grads = {grad[0], grad[1], grad[2], grad[3], grad[4], grad[5]};
  moe_sft_adamw_config opt_cfg;
  moe_sft_adamw_config_init(&opt_cfg);
  opt_cfg.lr = 2e-2;
  opt_cfg.max_grad_norm = 1e-2; /* clip the global grad norm to this */
  moe_sft_adamw *opt;
  CHECK(moe_sft_adamw_create(&opt_cfg, 6, params, &opt));

  float *got = checked_malloc((size_t)T * H * sizeof *got);
  float *d_out = checked_malloc((size_t)T * H * sizeof *d_out);
  uint16_t *grad_out = checked_malloc((size_t)T * H * sizeof *grad_out);
  uint16_t *grad_x = checked_malloc((size_t)T * H * sizeof *grad_x);
  double first_loss = 0, loss = 0;
  for (int step = 0; step <= steps; ++step) {
    CHECK(moe_sft_forward(layer, T, K, ids, weights, x, out, /*save_for_backward=*/1));
    CHECK(moe_sft_bf16_to_f32(out, got, (int64_t)T * H));
    loss = 0; /* mean squared error over the batch, and its gradient d loss / d out */
    for (size_t i = 0; i < (size_t)T * H; ++i) {
      const double diff = (double)got[i] - target[i];
      loss += diff * diff;
      d_out[i] = (float)(2.0 * diff / ((double)T * H));
    }
    loss /= (double)T * H;
    if (step == 0) first_loss = loss;
    if (step == steps) { /* the last forward only measures */
      CHECK(moe_sft_discard_saved(layer, 1));
      printf("step %3d  loss %.6e\n", step, loss);
      break;
    }
    CHECK(moe_sft_bf16_from_f32(d_out, grad_out, (int64_t)T * H));
    CHECK(moe_sft_backward(layer, grad_out, grad_x, NULL, &grads, /*accumulate=*/0));
    moe_sft_adamw_report report;
    report.struct_size = sizeof report;
    CHECK(moe_sft_adamw_step(opt, (const float *const *)grad, &report));
    printf("step %3d  loss %.6e  grad norm %.3e%s\n", step, loss, report.grad_norm,
           report.clip_coef < 1 ? " (clipped)" : "");
    if (report.skipped)
      printf("          skipped: %s[%lld] = %g\n", report.bad_param_name, (long long)report.bad_index, report.bad_value);
  }
  const int fell = loss < 0.5 * first_loss;
  printf("train: loss %s from %.6e to %.6e in %d steps\n", fell ? "fell" : "did NOT fall enough", first_loss, loss,
         steps);

  moe_sft_adamw_destroy(opt);
  moe_sft_destroy(layer);
  for (int i = 0; i < 6; ++i) {
    free(t_arrays[i]);
    free(student[i]);
    free(grad[i]);
  }
  free(x);
  free(ids);
  free(weights);
  free(out);
  free(target);
  free(got);
  free(d_out);
  free(grad_out);
  free(grad_x);
  return fell ? 0 : 1;
}
