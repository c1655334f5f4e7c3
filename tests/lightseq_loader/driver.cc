// Loads a LightSeq GPT HDF5 file with LightSeq 3.0.1's own loader -- GptWeight<FP16> (fp16 files) or
// QuantGptWeight<FP16> (int8 files), the precision LightSeq's pip wheel runs -- compiled from the wheel's
// sources as they are, and prints what the loader read (test tooling: tests/oracles/lightseq_loader.py).
//
//   lightseq_loader_driver {gpt|quant_gpt} FILE.hdf5
//
// stdout: LightSeq's own progress lines, then lines starting "LSLOAD ":
//   LSLOAD conf NAME VALUE         the loader's fields (floats as C99 hex floats, exact; the sampling
//                                  method as hex bytes)
//   LSLOAD clip NAME VALUE         int8: the clips as QuantGptWeight stores them (float, hex)
//   LSLOAD weight NAME COUNT NONFINITE SUM SUMSQ BITSUM
//                                  one weight as the loader holds it (__half after its conversions):
//                                  SUM, SUMSQ of the values in double (in order; %.17g), and
//                                  BITSUM = sum over i of (i+1) * bits(value i), mod 2^64 (exact, position-sensitive)
//   LSLOAD ok
// On failure: "LSLOAD error MESSAGE" (the loader's exception text or returned message), exit status 2.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "gpt_weight.h"
#include "quant_gpt_weight.h"

using lightseq::cuda::GptWeight;
using lightseq::cuda::OperationType;
using lightseq::cuda::QuantGptWeight;

namespace {

const char *kEmb[] = {"token_embedding", "position_embedding", "norm_scale", "norm_bias"};
const char *kLayer[] = {"multihead_norm_scale", "multihead_norm_bias", "multihead_project_kernel_qkv",
                        "multihead_project_bias_qkv", "multihead_project_kernel_output",
                        "multihead_project_bias_output", "ffn_norm_scale", "ffn_norm_bias",
                        "ffn_first_kernel", "ffn_first_bias", "ffn_second_kernel", "ffn_second_bias"};
// QuantGptWeight::_enc_clip_max, per layer, in the order hdf5_parse_enc_wei pushes them
const char *kLayerClips[] = {"multihead_project_kernel_qkv_clip_max", "multihead_project_kernel_output_clip_max",
                             "ffn_first_kernel_clip_max", "ffn_second_kernel_clip_max",
                             "multihead_ln_clip_max", "multihead_project_output_clip_max", "ffn_ln_clip_max",
                             "ffn_first_act_clip_max", "multihead_qkv_dense_clip_max",
                             "multihead_output_dense_clip_max", "ffn_first_output_clip_max",
                             "self_qkv_bias_out_clip_max"};

void print_weight(const std::string &name, const __half *p, size_t n) {
  double sum = 0, sumsq = 0;
  uint64_t bitsum = 0;
  size_t nonfinite = 0;
  for (size_t i = 0; i < n; ++i) {
    float v = __half2float(p[i]);
    if (std::isfinite(v)) {
      sum += v;
      sumsq += double(v) * v;
    } else {
      ++nonfinite;
    }
    bitsum += uint64_t(i + 1) * uint64_t(p[i].__x);
  }
  std::printf("LSLOAD weight %s %zu %zu %.17g %.17g %" PRIu64 "\n", name.c_str(), n, nonfinite, sum, sumsq, bitsum);
}

template <class W>
void print_common(const W &w) {
  std::printf("LSLOAD conf hidden_size %d\nLSLOAD conf inner_size %d\nLSLOAD conf max_step %d\n", w._hidden_size,
              w._inner_size, w._max_step);
  std::printf("LSLOAD conf src_vocab_size %d\nLSLOAD conf n_enc_layer %d\nLSLOAD conf head_num %d\n",
              w._src_vocab_size, w._n_enc_layer, w._head_num);
  std::printf("LSLOAD conf dim_per_head %d\nLSLOAD conf weight_per_enc_layer %d\n", w._dim_per_head,
              w._weight_per_enc_layer);
  std::printf("LSLOAD conf padding_id %d\nLSLOAD conf eos_id %d\nLSLOAD conf extra_decode_length %d\n",
              w._padding_id, w._eos_id, w._extra_decode_length);
  std::printf("LSLOAD conf topk %d\nLSLOAD conf topp %a\nLSLOAD conf sampling_method ", w._topk, double(w._topp));
  for (unsigned char c : w._sampling_method) std::printf("%02x", c);
  std::printf("%s\n", w._sampling_method.empty() ? "-" : "");
  const size_t h = w._hidden_size, inner = w._inner_size;
  const size_t emb_sizes[] = {w._src_vocab_size * h, w._max_step * h, h, h};
  const auto &emb = w.get_src_emb_wei();
  for (size_t i = 0; i < emb.size(); ++i) print_weight(std::string("src_embedding/") + kEmb[i], emb[i], emb_sizes[i]);
  const size_t layer_sizes[] = {h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * inner, inner, inner * h, h};
  const auto &enc = w.get_enc_wei();
  for (size_t i = 0; i < enc.size(); ++i) {
    print_weight("encoder_stack/" + std::to_string(i / 12) + "/" + kLayer[i % 12], enc[i], layer_sizes[i % 12]);
  }
}

int load(const std::string &kind, const std::string &path) {
  std::string res;
  if (kind == "gpt") {
    // value-initialised: the loader leaves _eos_id unset when the file's eos_id is 0; it then reads 0 here
    auto w = new GptWeight<OperationType::FP16>();
    res = w->initializing(path);
    if (res.empty()) print_common(*w);
  } else if (kind == "quant_gpt") {
    auto w = new QuantGptWeight<OperationType::FP16>();
    res = w->initializing(path);
    if (res.empty()) {
      print_common(*w);
      std::printf("LSLOAD clip src_embedding/emb_clip_max %a\n", double(w->get_src_emb_clip_max()));
      std::printf("LSLOAD clip src_embedding/output_ln_clip_max %a\n", double(w->get_output_ln_clip_max()));
      std::printf("LSLOAD clip src_embedding/logits_clip_max %a\n", double(w->get_logits_clip_max()));
      std::printf("LSLOAD conf quant_range %a\n", double(w->_quant_range));
      auto clips = w->get_enc_clip_max();
      for (size_t i = 0; i < clips.size(); ++i) {
        std::printf("LSLOAD clip encoder_stack/%zu/%s %a\n", i / 12, kLayerClips[i % 12], double(clips[i]));
      }
    }
  } else {
    std::fprintf(stderr, "usage: lightseq_loader_driver {gpt|quant_gpt} FILE.hdf5\n");
    return 64;
  }
  if (!res.empty()) {
    std::printf("LSLOAD error %s\n", res.c_str());
    return 2;
  }
  std::printf("LSLOAD ok\n");
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: lightseq_loader_driver {gpt|quant_gpt} FILE.hdf5\n");
    return 64;
  }
  try {
    return load(argv[1], argv[2]);
  } catch (const std::exception &e) {
    std::fflush(stdout);
    std::printf("LSLOAD error %s\n", e.what());
    return 2;
  }
}
