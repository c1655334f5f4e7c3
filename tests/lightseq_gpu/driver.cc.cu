// Runs LightSeq 3.0.1's own GPT inference -- GptEncoder<FP16> on fp16 files, QuantGptEncoder<FP16> on int8 files,
// built from the lightseq wheel's sources (plus tests/lightseq_gpu/cuda13.patch) for the H100 -- greedily on
// prompts read from stdin, set up as LightSeq's pywrapper (pywrapper/gpt.cc, quant_gpt.cc) sets it up.
// Test tooling: tests/oracles/lightseq_gpu.py.
//
//   lightseq_gpu_driver {gpt|quant_gpt} FILE.hdf5 NEW_TOKENS < PROMPTS
//
// PROMPTS: one prompt a line, token ids separated by spaces, every line the same length (LightSeq samples every
// row from the last column's logits, so a batch of unequal prompts is not what it runs). The file's sampling
// settings are overridden to greedy -- sampling_method "topk", topk 1 (an exact argmax in ker_topk_sample) -- and
// extra_decode_length to NEW_TOKENS, so each row grows to min(max_step, prompt + NEW_TOKENS) tokens unless every
// row has reached eos_id (finished rows are padded with eos_id, LightSeq's rule).
//
// stdout: LightSeq's own progress lines, then
//   LSGEN conf NAME VALUE      eos_id, padding_id, max_step, vocab (as the loader read them)
//   LSGEN row I ID ID ...      row I's whole sequence, prompt included
//   LSGEN ppl I VALUE          LightSeq's ppl (run_one_infer: mean NLL, natural log) of row I's whole sequence
//   LSGEN ms MILLISECONDS      the run_one_sample call, synchronised
//   LSGEN ok
// On failure: "LSGEN error MESSAGE", exit status 2.
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gpt_encoder.h"
#include "quant_gpt_encoder.h"

using namespace lightseq::cuda;

namespace {

constexpr OperationType kOp = OperationType::FP16;

std::vector<std::vector<int>> read_prompts() {
  std::vector<std::vector<int>> rows;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::vector<int> row;
    for (int id; in >> id;) row.push_back(id);
    if (row.empty()) continue;
    if (!rows.empty() && row.size() != rows[0].size()) throw std::runtime_error("prompts of unequal length");
    rows.push_back(row);
  }
  if (rows.empty()) throw std::runtime_error("no prompts on stdin");
  return rows;
}

// The encoder's life, as the pywrapper's: streams, a cuBLAS handle, the loaded weights, device input/output.
template <class Weight, class Encoder>
int generate(const std::string &path, int new_tokens, const std::vector<std::vector<int>> &rows) {
  const int batch = rows.size(), len = rows[0].size();
  cudaStream_t stream, cache_stream;
  cublasHandle_t hd;
  CHECK_GPU_ERROR(cudaSetDevice(0));
  CHECK_GPU_ERROR(cudaStreamCreate(&stream));
  CHECK_GPU_ERROR(cudaStreamCreate(&cache_stream));
  CHECK_GPU_ERROR(cublasCreate(&hd));
  CHECK_GPU_ERROR(cublasSetStream(hd, stream));
  auto tw = std::make_unique<Weight>();
  std::string res = tw->initializing(path);
  if (!res.empty()) throw std::runtime_error(res);
  tw->_sampling_method = "topk";  // greedy: ker_topk_sample with k = 1 is an exact argmax
  tw->_topk = 1;
  tw->_extra_decode_length = new_tokens;
  std::printf("LSGEN conf eos_id %d\nLSGEN conf padding_id %d\nLSGEN conf max_step %d\nLSGEN conf vocab %d\n",
              tw->_eos_id, tw->_padding_id, tw->_max_step, tw->_src_vocab_size);
  if (len > tw->_max_step) throw std::runtime_error("prompt longer than max_step");

  int *d_input, *d_sample_id;
  float *d_ppl;
  CHECK_GPU_ERROR(cudaMalloc(&d_input, batch * tw->_max_step * sizeof(int)));
  CHECK_GPU_ERROR(cudaMalloc(&d_sample_id, batch * tw->_max_step * sizeof(int)));
  CHECK_GPU_ERROR(cudaMalloc(&d_ppl, batch * sizeof(float)));
  auto encoder = std::make_shared<Encoder>(batch, d_input, d_ppl, d_sample_id, *tw, stream, cache_stream, hd);
  res = encoder->check();
  if (!res.empty()) throw std::runtime_error(res);
  void *d_buf = nullptr;
  if constexpr (std::is_same_v<Encoder, GptEncoder<kOp>>) {
    size_t bytes = encoder->compute_buffer_bytesize();
    CHECK_GPU_ERROR(cudaMalloc(&d_buf, bytes));
    encoder->init_buffer(d_buf);
  } else {
    encoder->init_buffer();
  }
  CHECK_GPU_ERROR(cudaStreamSynchronize(stream));

  std::vector<int> flat;
  for (const auto &r : rows) flat.insert(flat.end(), r.begin(), r.end());
  CHECK_GPU_ERROR(cudaMemcpy(d_input, flat.data(), flat.size() * sizeof(int), cudaMemcpyHostToDevice));
  auto t0 = std::chrono::steady_clock::now();
  int out_len = encoder->run_one_sample(batch, len);
  CHECK_GPU_ERROR(cudaStreamSynchronize(stream));
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  std::vector<int> out(size_t(batch) * out_len);
  CHECK_GPU_ERROR(cudaMemcpy(out.data(), encoder->_p_d_sample_id, out.size() * sizeof(int), cudaMemcpyDeviceToHost));
  for (int b = 0; b < batch; ++b) {
    std::printf("LSGEN row %d", b);
    for (int t = 0; t < out_len; ++t) std::printf(" %d", out[size_t(b) * out_len + t]);
    std::printf("\n");
  }
  // LightSeq's ppl (run_one_infer: the full-sequence forward, no cache) of the rows it generated: a continuous
  // check of every logit, beside the argmax one
  CHECK_GPU_ERROR(cudaMemcpy(d_input, out.data(), out.size() * sizeof(int), cudaMemcpyHostToDevice));
  encoder->run_one_infer(batch, out_len);
  CHECK_GPU_ERROR(cudaStreamSynchronize(stream));
  std::vector<float> ppl(batch);
  CHECK_GPU_ERROR(cudaMemcpy(ppl.data(), encoder->_p_d_ppl, batch * sizeof(float), cudaMemcpyDeviceToHost));
  for (int b = 0; b < batch; ++b) std::printf("LSGEN ppl %d %.9g\n", b, ppl[b]);
  std::printf("LSGEN ms %.3f\nLSGEN ok\n", ms);
  std::fflush(stdout);
  // no teardown: the process ends here (the encoders' destructors free what they own, not all of it)
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: lightseq_gpu_driver {gpt|quant_gpt} FILE.hdf5 NEW_TOKENS < PROMPTS\n");
    return 64;
  }
  const std::string kind = argv[1], path = argv[2];
  try {
    const int new_tokens = std::stoi(argv[3]);
    auto rows = read_prompts();
    if (kind == "gpt") return generate<GptWeight<kOp>, GptEncoder<kOp>>(path, new_tokens, rows);
    if (kind == "quant_gpt") return generate<QuantGptWeight<kOp>, QuantGptEncoder<kOp>>(path, new_tokens, rows);
    std::fprintf(stderr, "unknown kind %s (gpt | quant_gpt)\n", kind.c_str());
    return 64;
  } catch (const std::exception &e) {
    std::fflush(stdout);
    std::printf("LSGEN error %s\n", e.what());
    return 2;
  }
}
