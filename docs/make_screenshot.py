"""Makes docs/playground.png, the README's picture of the playground: serves MODEL with `bytelm serve` on a free
loopback port, opens http://127.0.0.1:PORT/ in headless Chromium (Debian's, through Playwright; nothing downloaded),
generates from a prompt and hovers one byte so that its tooltip shows.

    python docs/make_screenshot.py runs/megabyte-small            # the quickstart's model
    python docs/make_screenshot.py MODEL --prompt "import " --seed 3 --out /tmp/shot.png
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

MAX_BYTES = 300_000  # the committed PNG stays small


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, name: str, port: int) -> subprocess.Popen:
    """`bytelm serve` in a session of its own (killed by process group), once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "serve", model, "--model-name", name, "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bytelm serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("bytelm serve did not answer in 120 s")


def shoot(url: str, args: argparse.Namespace) -> bytes:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(url)
        page.wait_for_selector("#model:has-text('context')")
        page.fill("#prompt", args.prompt)
        for field in ("max_tokens", "temperature", "top_p", "seed"):
            page.fill(f"#{field}", str(getattr(args, field)))
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=300_000)
        # the tooltip of a byte the model hesitated over (p nearest 1/3: then it is among the 5 likeliest, shown
        # highlighted), among the first `hover_within`
        probs = page.eval_on_selector_all("#bytes .byte", "s => s.map(e => +e.dataset.p)")[: args.hover_within]
        page.hover(f"#bytes .byte[data-i='{min(range(len(probs)), key=lambda i: abs(probs[i] - 1 / 3))}']")
        page.wait_for_selector("#tooltip:not([hidden])")
        png = page.screenshot()
        browser.close()
    return png


def small_png(png: bytes) -> bytes:
    """The screenshot as a 256-colour PNG when the full-colour one is over MAX_BYTES (the page is mostly flat
    colours: it looks the same)."""
    if len(png) <= MAX_BYTES:
        return png
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", help="a model folder or run folder (read only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("playground.png"))
    ap.add_argument("--prompt", default="def fibonacci(n):\n")
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=280)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", dest="top_p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hover-within", type=int, default=120, help="hover the least likely of the first N bytes")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--chromium", default=os.environ.get("BYTELM_CHROMIUM") or shutil.which("chromium"))
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium found: apt-get install -y chromium, or pass --chromium PATH")
    port = free_port()
    proc = serve(args.model, Path(args.model).resolve().name, port)
    try:
        png = small_png(shoot(f"http://127.0.0.1:{port}/", args))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png) / 1000:.0f} KB")


if __name__ == "__main__":
    main()
