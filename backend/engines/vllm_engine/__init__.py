"""The vLLM engine (`ENGINE=vllm`): vLLM's `AsyncLLM` owned by this process, behind `EngineClient`.

- `options.py`: settings -> vLLM's engine arguments and sampling parameters (plain dicts, testable without
  vLLM installed), and whether vLLM can serve a checkpoint (`ENGINE=auto`).
- `engine.py`: `VllmEngine`: our prompt rendering and image intake, vLLM's scheduling and kernels; our
  promises on top (bounded queue, deadlines, aborts, a clear state when the engine core dies).
- `observe.py`: what vLLM reports each step (KV-cache use, running and waiting requests), and GPU memory
  read through NVML (the engine core is another process, so torch's allocator here knows nothing of it).
"""
