"""ShizhenGPT inference server: an OpenAI-compatible FastAPI app around a Qwen2.5-VL model."""
