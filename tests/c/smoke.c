/* smoke.c: a C11 consumer of moe_sft that includes only moe_sft.h and links only libmoe_sft.
 *
 * usage: smoke DIR
 *
 * DIR holds a small problem written by tests/test_c_consumers.py: dims.txt ("E H I K T R ALPHA"), the inputs
 * as raw arrays in native byte order (bf16 as uint16 words) and the float64 numpy reference's expected outputs
 * (expected_*.bin, double). The program trains nothing; it creates a layer, binds f32 LoRA, runs
 * forward + backward and compares every output with the reference by mean|a - b| / mean|b| <= 1e-2, then
 * checks error paths: a bad expert id, backward with nothing saved, destroy(NULL). It prints one line per
 * check and exits 0 only if all pass.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_sft.h"

#define TOLERANCE 1e-2

static int failures = 0;

static void check(int ok, const char *what, const char *detail) {
  printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail[0] ? ": " : "", detail);
  failures += !ok;
}

/* Reads DIR/NAME.bin, which must be exactly count * size bytes; exits on any mismatch (the harness wrote it). */
static void *load(const char *dir, const char *name, size_t count, size_t size) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.bin", dir, name);
  FILE *f = fopen(path, "rb");
  void *data = malloc(count * size + 1);
  if (!f || !data || fread(data, size, count, f) != count || fgetc(f) != EOF) {
    fprintf(stderr, "smoke: cannot read %zu x %zu bytes from %s\n", count, size, path);
    exit(2);
  }
  fclose(f);
  return data;
}

static double absolute(double v) { return v < 0 ? -v : v; } /* not fabs: the program needs no -lm */

static double bf16_to_double(uint16_t bits) {
  uint32_t word = (uint32_t)bits << 16;
  float value;
  memcpy(&value, &word, sizeof value);
  return value;
}

/* Compares n values (bf16 words when bf16 != 0, else float) with the reference's expected DIR/expected_NAME.bin. */
static void compare(const char *dir, const char *name, const void *got, size_t n, int bf16) {
  char expected_name[256], detail[128];
  snprintf(expected_name, sizeof expected_name, "expected_%s", name);
  double *expected = load(dir, expected_name, n, sizeof(double));
  double diff = 0, magnitude = 0;
  for (size_t i = 0; i < n; ++i) {
    double value = bf16 ? bf16_to_double(((const uint16_t *)got)[i]) : ((const float *)got)[i];
    diff += absolute(value - expected[i]);
    magnitude += absolute(expected[i]);
  }
  double err = magnitude > 0 ? diff / magnitude : diff;
  snprintf(detail, sizeof detail, "mean|a-b|/mean|b| = %.2e (<= %.0e)", err, TOLERANCE);
  check(err <= TOLERANCE, name, detail);
  free(expected);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: smoke DIR\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0); /* each check's line survives a sanitizer ending the process early */
  const char *dir = argv[1];
  char path[4096], detail[512];
  snprintf(path, sizeof path, "%s/dims.txt", dir);
  FILE *dims = fopen(path, "r");
  int E, H, I, K, T, R;
  float alpha;
  if (!dims || fscanf(dims, "%d %d %d %d %d %d %f", &E, &H, &I, &K, &T, &R, &alpha) != 7 || T < 4 || K < 2) {
    fprintf(stderr, "smoke: cannot read E H I K T R ALPHA (T >= 4, K >= 2) from %s\n", path);
    return 2;
  }
  fclose(dims);

  snprintf(detail, sizeof detail, "library %u, header %d", (unsigned)moe_sft_version(), MOE_SFT_VERSION_NUMBER);
  check(moe_sft_version() == MOE_SFT_VERSION_NUMBER, "version", detail);

  const size_t ih = (size_t)E * I * H, rh = (size_t)E * R * H, ir = (size_t)E * I * R, ri = (size_t)E * R * I,
               hr = (size_t)E * H * R, th = (size_t)T * H, tk = (size_t)T * K;
  uint16_t *gate = load(dir, "gate", ih, 2), *up = load(dir, "up", ih, 2), *down = load(dir, "down", ih, 2);
  float *lora[6] = {load(dir, "gate_a", rh, 4), load(dir, "gate_b", ir, 4), load(dir, "up_a", rh, 4),
                    load(dir, "up_b", ir, 4),   load(dir, "down_a", ri, 4), load(dir, "down_b", hr, 4)};
  const size_t lora_sizes[6] = {rh, ir, rh, ir, ri, hr};
  uint16_t *x = load(dir, "x", th, 2), *grad_out = load(dir, "grad_out", th, 2);
  int64_t *ids = load(dir, "ids", tk, 8);
  float *weights = load(dir, "weights", tk, 4);

  moe_sft_config cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = E;
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.lora_rank = R;
  cfg.lora_alpha = alpha;
  cfg.num_threads = 2;
  cfg.gate_proj = gate;
  cfg.up_proj = up;
  cfg.down_proj = down;
  moe_sft_layer *layer = NULL;
  moe_sft_status status = moe_sft_create(&cfg, &layer);
  check(status == MOE_SFT_OK && layer, "create", moe_sft_last_error());
  if (!layer) return 1;
  free(gate); /* packed at create: the caller's copies may go */
  free(up);
  free(down);
  const char *isa = moe_sft_layer_isa(layer);
  check(isa && isa[0], "layer_isa", isa ? isa : "NULL");

  moe_sft_lora bound = {MOE_SFT_DTYPE_F32, lora[0], lora[1], lora[2], lora[3], lora[4], lora[5]};
  status = moe_sft_update_lora(layer, &bound);
  check(status == MOE_SFT_OK, "update_lora", moe_sft_last_error());

  uint16_t *out = malloc(th * 2), *grad_input = malloc(th * 2);
  float *grad_weights = malloc(tk * 4), *d_lora[6];
  for (int i = 0; i < 6; ++i) d_lora[i] = malloc(lora_sizes[i] * 4);
  status = moe_sft_forward(layer, T, K, ids, weights, x, out, 1);
  check(status == MOE_SFT_OK, "forward", moe_sft_last_error());
  compare(dir, "output", out, th, 1);
  moe_sft_lora_grads grads = {d_lora[0], d_lora[1], d_lora[2], d_lora[3], d_lora[4], d_lora[5]};
  status = moe_sft_backward(layer, grad_out, grad_input, grad_weights, &grads, 0);
  check(status == MOE_SFT_OK, "backward", moe_sft_last_error());
  compare(dir, "input", grad_input, th, 1);
  compare(dir, "routing_weights", grad_weights, tk, 0);
  const char *lora_names[6] = {"gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"};
  for (int i = 0; i < 6; ++i) compare(dir, lora_names[i], d_lora[i], lora_sizes[i], 0);

  /* A bad id: the right status, a message naming the slot and value, the output untouched, nothing cached. */
  ids[3 * K + 1] = E;
  for (size_t i = 0; i < th; ++i) out[i] = 0x7bcd;
  status = moe_sft_forward(layer, T, K, ids, weights, x, out, 1);
  char message[256], needle[64]; /* the message lives only until this thread's next call: copy it first */
  snprintf(message, sizeof message, "%s", moe_sft_last_error());
  check(status == MOE_SFT_ERR_INVALID_ARGUMENT, "bad id: status", moe_sft_status_string(status));
  snprintf(needle, sizeof needle, "expert_ids[3, 1] = %d", E);
  snprintf(detail, sizeof detail, "\"%s\" in \"%s\"", needle, message);
  check(strstr(message, needle) != NULL, "bad id: message", detail);
  int untouched = 1;
  for (size_t i = 0; i < th; ++i) untouched &= out[i] == 0x7bcd;
  check(untouched, "bad id: output untouched", "");
  int32_t depth = -1;
  status = moe_sft_cache_depth(layer, &depth);
  check(status == MOE_SFT_OK && depth == 0, "bad id: nothing cached", "");
  status = moe_sft_backward(layer, grad_out, grad_input, grad_weights, &grads, 0);
  check(status == MOE_SFT_ERR_CACHE_EMPTY, "backward with nothing saved", moe_sft_status_string(status));
  check(strcmp(moe_sft_status_string(MOE_SFT_OK), "MOE_SFT_OK") == 0, "status_string", "");

  moe_sft_destroy(layer);
  moe_sft_destroy(NULL); /* documented as fine */
  check(1, "destroy(NULL)", "");

  free(out);
  free(grad_input);
  free(grad_weights);
  for (int i = 0; i < 6; ++i) {
    free(lora[i]);
    free(d_lora[i]);
  }
  free(x);
  free(grad_out);
  free(ids);
  free(weights);
  printf("smoke: %s\n", failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
