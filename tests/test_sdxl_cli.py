"""The CLIs on SDXL: txt2img with a refiner (its PNG names the refiner as AUTOMATIC1111 does and regenerates bit
for bit), the refiner alone as img2img, the SDXL conditioning flags; and the wrong model in the wrong place
refused in one line with exit code 2 and nothing written."""

import numpy as np
from conftest import run_main
from PIL import Image

from ldm.cli import img2img, txt2img
from ldm.outputs import read_generation
from ldm.pipelines.pipeline import Pipeline

PROMPT = "a red circle at the top left"


def _refused(main, argv, capsys, out, *words):
    code, _, err = run_main(main, [*argv, "--out", str(out)], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() or not any(out.iterdir())


def test_txt2img_with_refiner_writes_a1111_fields_and_regenerates(
    tmp_path, capsys, tiny_sdxl_folder, tiny_refiner_folder
):
    out = tmp_path / "out"
    argv = [
        "--weights",
        str(tiny_sdxl_folder),
        "--prompt",
        PROMPT,
        "--steps",
        "6",
        "--sampler",
        "euler",
        "--seed",
        "4",
        "--refiner",
        str(tiny_refiner_folder),
        "--refiner-switch",
        "0.7",
        "--original-size",
        "96x128",
        "--out",
        str(out),
    ]
    code, stdout, err = run_main(txt2img.main, argv, capsys)
    assert code == 0, err
    path = stdout.strip().splitlines()[-1]
    text = Image.open(path).text["parameters"]
    assert "Refiner: pipe [" in text and "Refiner switch at: 0.7" in text
    generation = read_generation(path)
    assert generation.request.refiner_switch == 0.7 and generation.request.original_size == (128, 96)
    # the same pixels as the Python API
    base, refiner = Pipeline.from_pretrained(tiny_sdxl_folder), Pipeline.from_pretrained(tiny_refiner_folder)
    api = base(
        PROMPT,
        steps=6,
        sampler="euler",
        seed=4,
        refiner=refiner,
        refiner_switch=0.7,
        original_size=(128, 96),
        progress=False,
    )[0]
    assert np.array_equal(np.asarray(api), np.asarray(Image.open(path)))
    # --from-png again: the same image; without the refiner: refused
    code, stdout, err = run_main(
        txt2img.main,
        [
            "--from-png",
            path,
            "--weights",
            str(tiny_sdxl_folder),
            "--refiner",
            str(tiny_refiner_folder),
            "--out",
            str(tmp_path / "again"),
        ],
        capsys,
    )
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(stdout.strip().splitlines()[-1])), np.asarray(Image.open(path)))
    _refused(
        txt2img.main,
        ["--from-png", path, "--weights", str(tiny_sdxl_folder)],
        capsys,
        tmp_path / "no",
        "made with refiner pipe",
        "--refiner FILE",
    )


def test_refiner_alone_is_img2img(tmp_path, capsys, tiny_refiner_folder):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    argv = [
        "--weights",
        str(tiny_refiner_folder),
        "--image",
        str(picture),
        "--prompt",
        PROMPT,
        "--steps",
        "4",
        "--strength",
        "0.3",
        "--aesthetic-score",
        "7",
        "--out",
        str(tmp_path / "out"),
    ]
    code, stdout, err = run_main(img2img.main, argv, capsys)
    assert code == 0, err
    assert read_generation(stdout.strip().splitlines()[-1]).request.aesthetic_score == 7.0


def test_wrong_models_in_wrong_places_are_refused(
    tmp_path, capsys, tiny_sdxl_folder, tiny_refiner_folder, tiny_sd_folder
):
    out = tmp_path / "out"
    common = ["--prompt", PROMPT, "--steps", "2"]
    _refused(
        txt2img.main, ["--weights", str(tiny_refiner_folder), *common], capsys, out, "is an SDXL refiner", "--refiner"
    )
    _refused(
        txt2img.main,
        ["--weights", str(tiny_sdxl_folder), "--refiner", str(tiny_sdxl_folder), *common],
        capsys,
        out,
        "is an SDXL base model",
        "not an SDXL refiner",
    )
    _refused(
        txt2img.main,
        ["--weights", str(tiny_sd_folder), "--refiner", str(tiny_refiner_folder), *common],
        capsys,
        out,
        "SD1/SD2",
    )
    _refused(
        txt2img.main,
        ["--weights", str(tiny_sdxl_folder), "--refiner", str(tmp_path / "none"), *common],
        capsys,
        out,
        "--refiner",
        "not found",
    )
    _refused(
        txt2img.main,
        ["--weights", str(tiny_sdxl_folder), "--refiner-switch", "1.5", *common],
        capsys,
        out,
        "--refiner-switch 1.5",
    )
    _refused(
        txt2img.main,
        ["--weights", str(tiny_sdxl_folder), "--original-size", "big", *common],
        capsys,
        out,
        "WIDTHxHEIGHT",
    )


def test_bad_sdxl_files_and_loras_are_refused(tmp_path, capsys, tiny_sdxl_folder, tiny_sd_folder):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldm.formats.checkpoint import read_state_dict

    out = tmp_path / "out"
    full = Pipeline.from_pretrained(tiny_sdxl_folder).save_single_file(tmp_path / "xl.safetensors")
    with safe_open(str(full), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in read_state_dict(full).items() if not k.startswith("conditioner.embedders.0.")}
    save_file(tensors, str(tmp_path / "no_clip_l.safetensors"), metadata=meta)
    _refused(
        txt2img.main,
        ["--weights", str(tmp_path / "no_clip_l.safetensors"), "--prompt", PROMPT],
        capsys,
        out,
        "no_clip_l.safetensors",
        "CLIP ViT-L",
        "needs both",
    )
    # an SDXL LoRA (CLIP-L/bigG parts, 2048-wide cross-attention) on an SD1 model
    g = torch.Generator().manual_seed(0)
    lora = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(
            4, 2048, generator=g
        ),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(32, 4, generator=g),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 4, generator=g),
    }
    save_file(lora, str(tmp_path / "xl_lora.safetensors"))
    _refused(
        txt2img.main,
        [
            "--weights",
            str(tiny_sd_folder),
            "--lora",
            str(tmp_path / "xl_lora.safetensors"),
            "--prompt",
            PROMPT,
            "--steps",
            "2",
        ],
        capsys,
        out,
        "xl_lora.safetensors",
        "an SDXL LoRA",
        "SD1",
    )
