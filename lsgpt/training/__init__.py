"""Training: the run_clm CLI (`train`), QAT fake quantizers (`qat`), the compiled fast path (`fasttrain`), the demo corpus (`corpus`) and its vocabulary subset (`vocab_subset`)."""
