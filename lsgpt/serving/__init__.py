"""Serving: the Triton model (`triton_model`, run by `backend/model.py`), `launcher`, `repository`, `openai_api`."""
