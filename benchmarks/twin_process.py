"""The PyTorch twin in a process of its own, driven by the suite over a pipe: each side times its own windows.

Why a process of its own: sharing one with JAX changed JAX's numbers, not the twin's. On a 2-core Xeon the
mid-size JAX train step ran at 7.6 images/s alone and at 4.1 beside the loaded twin, the difference all
kernel time (the same 1.7 GB of page faults per step costing 0.6 s of system time in the first window and
2.4 s in later ones). A user runs one framework per process, so the suite does too, and still alternates
the two windows by window, so both see the same machine load.

The protocol is one JSON object per line: a request {"op": name, **arguments} on the server's stdin, a reply
{"result": ...} or {"error": "one line"} on its stdout. `serve` runs any handler whose `op_<name>` methods
take the arguments; `TwinHandler` is the twin's. Run as a script, this file is the twin's server.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def serve(handler, requests, replies) -> None:
    """Answers each request line from `requests` on `replies` until "exit" or end of input."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
        except (ValueError, KeyError, AttributeError) as e:
            reply = {"error": f"bad request {line.strip()[:80]!r}: {e}"}
        else:
            if op == "exit":
                break
            method = getattr(handler, f"op_{op}", None)
            if method is None:
                reply = {"error": f"unknown op {op!r}"}
            else:
                try:
                    reply = {"result": method(**request)}
                except Exception as e:  # noqa: BLE001  (reported to the client, one line, the server goes on)
                    text = " ".join(str(e).split()) or "(no message)"
                    reply = {"error": f"{op}: {type(e).__name__}: {text}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class TwinProcess:
    """Client: starts a server (by default the twin's) in a subprocess; `call` is one request and its reply."""

    def __init__(self, argv: list[str] | None = None, env: dict | None = None, timeout: float = 900.0):
        # timeout: seconds one reply may take (the longest twin window, a mid-size 25-step sampling, takes
        # about 12 s on 2 cores); past it the server is taken for hung, killed, and the call fails.
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv or [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def _last_stderr_line(self) -> str:
        self._stderr.seek(0)
        lines = [x for x in self._stderr.read().splitlines() if x.strip()]
        return lines[-1] if lines else "(nothing printed)"

    def call(self, op: str, **arguments):
        """The result of one request; RuntimeError (one line) on an error reply or a dead server."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self.proc.stdin.flush()
            # One request, one reply line: nothing is buffered between calls, so waiting on the pipe is exact.
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            if not ready:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"twin process did not answer {op!r} within {self.timeout:g} s; killed it")
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait()
            raise RuntimeError(f"twin process exited ({self.proc.returncode}): {self._last_stderr_line()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"twin process: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        """Asks the server to exit; kills it if it does not within 30 s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unet_fields(config) -> dict:
    """The twin UNet's constructor arguments, read off the flax module the config builds (imports jax)."""
    from semflow_jax.models import build_model

    jax_unet = build_model(config)
    fields = "channels channel_mults num_res_blocks attention_resolutions num_heads num_groups".split()
    return {
        "out_channels": jax_unet.out_channels,
        "image_size": int(config.data.image_size),
        **{k: getattr(jax_unet, k) for k in fields},
    }


def write_setup(path: str, config, params_f32, params_bf16, host_batches, z, anchors, v_jax) -> None:
    """Everything the twin needs, as numpy and plain values: the config and UNet, both weights, the data.

    The UNet's arguments travel too, so the twin's process never imports jax (its memory is the twin's).
    params_bf16 may be None: then no bfloat16 twin is built.
    """
    import numpy as np

    def to_numpy(tree):
        return {k: to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}

    with open(path, "wb") as f:
        pickle.dump(
            {
                "config": config.to_dict(),
                "unet": unet_fields(config),
                "params_f32": to_numpy(params_f32),
                "params_bf16": None if params_bf16 is None else to_numpy(params_bf16),
                "host_batches": [{k: np.asarray(b[k]) for k in ("image", "label")} for b in host_batches],
                "z": np.asarray(z),
                "anchors": np.asarray(anchors),
                "v_jax": np.asarray(v_jax),
            },
            f,
        )


class TorchSide:
    """The twin of one JAX side: same model and weights, same train step and Euler sampler."""

    def __init__(
        self, config, unet: dict, params, host_batches, z, anchors, autocast_dtype=None, device="cpu"
    ):
        import numpy as np
        import torch
        import torch_twin

        self.torch, self.twin, self.device = torch, torch_twin, torch.device(device)
        self.model = torch_twin.UNet(**unet)
        torch_twin.load_flax_params(self.model, params)
        self.model.to(self.device)
        self.num_params = torch_twin.num_params(self.model)
        self.autocast = autocast_dtype
        self.step = torch_twin.TrainStep(self.model, config, anchors, autocast_dtype)
        # The batches live on the twin's device already, as JAX's do on its own (the suite times steps,
        # not host-to-device copies).
        self.batches = [
            (
                torch.from_numpy(np.array(b["image"])).to(self.device),
                torch.from_numpy(np.array(b["label"], np.int64)).to(self.device),
            )
            for b in host_batches
        ]
        self.z = torch.from_numpy(np.array(z)).to(self.device)
        self.count = 0

    def synchronize(self):
        """Waits for the work queued on the twin's device (a GPU runs asynchronously; a CPU does not)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def forward_once(self):
        """One forward pass of the twin on the sampler batch at t = 0.5, as one step of its sampler."""
        with self.torch.inference_mode():
            t = self.torch.full((self.z.shape[0],), 0.5 * self.twin.TIME_SCALE, device=self.device)
            return self.model(self.z, t)

    def train(self, steps: int):
        """`steps` twin train steps."""
        for _ in range(steps):
            image, label = self.batches[self.count % len(self.batches)]
            loss = self.step(image, label)
            self.count += 1
        return loss

    def sample(self, n: int):
        """The twin's Euler integration of the sampler batch, image -> mask."""
        return self.twin.integrate(self.model, self.z, 1.0, n, self.autocast)


def torch_convolution(lhs, rhs, strides, padding):
    """(forward, forward + backward) callables of one convolution as the twin runs it, on random data.

    lhs and rhs are XLA's NHWC input and HWIO kernel shapes, padding XLA's ((lo, hi), (lo, hi)); torch runs
    NCHW / OIHW, with F.pad first where the padding is uneven, as the twin's stride-2 convolutions do.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    n, h, w, cin = lhs
    kh, kw, _, cout = rhs
    x = torch.randn(n, cin, h, w, generator=gen)
    k = torch.randn(cout, cin, kh, kw, generator=gen) * 0.05
    (plo, phi), (qlo, qhi) = padding

    def conv(x, k):
        if plo == phi and qlo == qhi:
            return F.conv2d(x, k, stride=tuple(strides), padding=(plo, qlo))
        return F.conv2d(F.pad(x, (qlo, qhi, plo, phi)), k, stride=tuple(strides))

    with torch.no_grad():
        cotangent = torch.randn(conv(x, k).shape, generator=gen)
    xg, kg = x.clone().requires_grad_(True), k.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            conv(x, k)

    def forward_backward():
        torch.autograd.grad(conv(xg, kg), (xg, kg), cotangent)

    return forward, forward_backward


class TwinHandler:
    """The twin's server ops: `setup` from the JAX side's file, then timed windows, then peak memory."""

    def __init__(self):
        self.f32 = self.bf16 = None
        self.convs = []

    def op_setup(self, path: str, device: str = "cpu") -> dict:
        """Builds the float32 and bfloat16 twins on `device` ("cpu", "cuda", "cuda:1", ...); the twin's
        version, threads, device, size and its parity with JAX."""
        import ml_collections
        import numpy as np
        import torch

        with open(path, "rb") as f:
            data = pickle.load(f)
        config = ml_collections.ConfigDict(data["config"])
        if torch.device(device).type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device!r} asked for, but this torch sees no CUDA GPU")
            # Fixed shapes: let cuDNN pick its fastest algorithms, as a PyTorch user timing a GPU would.
            torch.backends.cudnn.benchmark = True

        def side(params, dtype=None):
            batches, z, anchors = data["host_batches"], data["z"], data["anchors"]
            return TorchSide(config, data["unet"], params, batches, z, anchors, dtype, device)

        self.f32 = side(data["params_f32"])
        if data["params_bf16"] is not None:
            self.bf16 = side(data["params_bf16"], torch.bfloat16)
        v_jax = data["v_jax"]
        v_twin = self.f32.forward_once().cpu().numpy()
        return {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(self.f32.device),
            "device_name": torch.cuda.get_device_name(self.f32.device)
            if self.f32.device.type == "cuda"
            else None,
            # What float32 means on a GPU: cuDNN convolutions may use TF32 by default, matmuls by this flag.
            "tf32": {
                "cudnn": bool(torch.backends.cudnn.allow_tf32),
                "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            },
            "num_params": self.f32.num_params,
            # max |v_jax - v_twin| / max |v_jax| on the sampler batch at t = 0.5, same weights
            "parity_max_rel_diff": float(np.abs(v_jax - v_twin).max() / max(np.abs(v_jax).max(), 1e-12)),
            "jax_imported": "jax" in sys.modules,  # False: this process's memory and threads are the twin's
        }

    def op_window(self, key: str, count: int) -> dict:
        """One timed window in this process: {"sec", "user", "system"} (see timing.window)."""
        from timing import window

        runs = {
            "forward": lambda: self.f32.forward_once(),
            "train": lambda: self.f32.train(count),
            "sample": lambda: self.f32.sample(count),
            "train_bf16": lambda: self.bf16.train(count),
            "sample_bf16": lambda: self.bf16.sample(count),
        }
        if self.f32 is None or (key.endswith("bf16") and self.bf16 is None):
            raise RuntimeError(f"setup has not built the twin that {key!r} needs")
        side = self.bf16 if key.endswith("bf16") else self.f32

        def run():  # the window ends when the device has done the work, not when it was queued
            runs[key]()
            side.synchronize()

        return window(run)

    def op_setup_convs(self, specs: list[dict]) -> int:
        """Builds one lone convolution per spec (see `torch_convolution`); returns how many."""
        self.convs = [torch_convolution(**spec) for spec in specs]
        return len(self.convs)

    def op_conv_window(self, index: int, kind: str) -> dict:
        """One timed window of convolution `index`: kind "fwd" or "fwd_bwd" (input and weight gradients)."""
        from timing import window

        forward, forward_backward = self.convs[index]
        return window({"fwd": forward, "fwd_bwd": forward_backward}[kind])

    def op_peak_rss_mib(self) -> float:
        """This process's peak resident memory so far, MiB."""
        from timing import peak_rss_mib

        return peak_rss_mib()


def main() -> None:
    """The twin's server on stdin/stdout; anything else printed to stdout goes to stderr instead."""
    for path in (ROOT, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)
    from semflow_jax.cpu import tuning

    tuning.tune()  # the malloc options the JAX process runs under (its XLA options are in the environment)

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print cannot corrupt the protocol
    serve(TwinHandler(), sys.stdin, replies)


if __name__ == "__main__":
    main()
