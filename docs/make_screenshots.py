"""Screenshots of ``report.html`` and an explorer snapshot for the docs (``docs/img/``).

Builds both pages from the bundled models and opens them in headless Chromium (selenium, Debian's
``chromium`` + ``chromium-driver``), as ``tests/test_browser.py`` does::

    python docs/make_screenshots.py            # writes docs/img/report.png, docs/img/explorer.png
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from attnres_lens import bundled, mass_vs_effect, viz

OUT = Path(__file__).resolve().parent / "img"
WIDTH = 1100


def pages(directory: Path) -> dict[str, Path]:
    trained = bundled.load_attnres()
    tokens = bundled.eval_tokens(trained, n_prompts=20, seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mass_vs_effect(trained, tokens, n_boot=200, seed=0)
    text = trained.to_string(bundled.eval_tokens(trained, n_prompts=1, seq_len=128)[0])
    other = trained.to_string(bundled.eval_tokens(trained, n_prompts=3, seq_len=128)[1])
    explorer = viz.explore(trained, text, patch_text=other, router="blocks.2.attn_router")
    explorer.session.set_choice("blocks.0.mlp_router", 0, "zero")
    explorer.update()
    report_path = viz.write_html_report({"trained": report}, directory / "report.html", title="attnres_lens report")
    explorer_path = directory / "explorer.html"
    explorer.snapshot_html(explorer_path)
    return {"report": report_path, "explorer": explorer_path}


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    torch.set_num_threads(1)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    OUT.mkdir(exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in pages(Path(tmp)).items():
                driver.get(path.as_uri())
                time.sleep(3)
                png = Path(tmp) / f"{name}.png"
                driver.save_screenshot(str(png))
                image = Image.open(png).convert("RGB")
                image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
                image.save(OUT / f"{name}.png", optimize=True)
                print(OUT / f"{name}.png", (OUT / f"{name}.png").stat().st_size // 1024, "KiB")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
