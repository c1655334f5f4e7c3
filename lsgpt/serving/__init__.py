"""Serving: the Triton model (`triton_model`, run by `backend/model.py`; with `requests`, `responses`, `outbox`,
`cancel`, `metrics`), `launcher`, `repository`, `openai_api`."""
