import json
from pathlib import Path

import pytest
import torch

from radacx_cache.models import ModelError, load_model, parse_model_spec

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "is", "a", "photo", "of", "edema",
         "cardio", "##megaly", "pleural", "effusion", "at", "##elect", "##asis", "consolidation"] + \
        [chr(c) for c in range(ord("a"), ord("z") + 1)]


def biomedclip_like_dir(path, seed=0):
    """A directory shaped like the hub repo (real open_clip_config.json structure, small towers)."""
    from transformers import BertConfig
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"timm_model_name": "radacx_vit_pico_patch32_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 256}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=512).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return config


def save_weights(path, seed=0):
    """Build the same architecture offline with seeded random weights and save it as the hub does."""
    from radacx_cache import models
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    cfg["text_cfg"]["hf_model_name"] = str(path)
    model = models._build("radacx-test-save", cfg, None, seed)
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model


def test_tiny_is_offline_and_seeded():
    a, b, c = load_model("tiny", seed=0), load_model("tiny", seed=0), load_model("tiny", seed=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fa, pa = a.encode_image_parts(x)
        fb, _ = b.encode_image_parts(x)
        fc, _ = c.encode_image_parts(x)
    assert fa.shape == (2, 64) and pa.shape == (2, 64)
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.tokenizer(["this is a photo of Edema"]).shape == (1, 32)


def test_local_directory_loads_offline_with_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "BiomedCLIP"
    biomedclip_like_dir(d)
    reference = save_weights(d, seed=3)
    loaded = load_model(str(d))
    for (k, v), (k2, v2) in zip(reference.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    tokens = loaded.tokenizer(["this is a photo of pleural effusion"])
    assert tokens.shape == (1, 256) and tokens[0, 0].item() == VOCAB.index("[CLS]")
    with torch.no_grad():
        text = loaded.model.encode_text(tokens)
    assert text.shape == (1, 32) and torch.isfinite(text).all()
    assert loaded.mean == (0.48145466, 0.4578275, 0.40821073)
    assert load_model(f"local-dir:{d}").fingerprint == loaded.fingerprint


def test_local_directory_errors_say_what_is_missing(tmp_path):
    d = tmp_path / "m"
    biomedclip_like_dir(d)
    with pytest.raises(ModelError, match="no weights file"):
        load_model(str(d))
    save_weights(d)
    (d / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(str(d))
    (d / "open_clip_config.json").unlink()
    with pytest.raises(ModelError, match="open_clip_config.json is missing"):
        load_model(str(d))


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
    d = tmp_path / "m"
    biomedclip_like_dir(d)
    save_weights(d)
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = 48
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not fit"):
        load_model(str(d))


def test_biomedclip_architecture_builds_offline_from_the_shipped_bert_config():
    m = load_model("biomedclip-random")
    assert m.tokenizer is None
    with torch.no_grad():
        feat, pre = m.encode_image_parts(torch.randn(1, 3, 224, 224))
    assert feat.shape == (1, 512) and pre.shape == (1, 768)  # BiomedCLIP: 768 CLS -> 512 embedding


def test_spec_parsing():
    assert parse_model_spec("biomedclip")[1].startswith("hf-hub:microsoft/BiomedCLIP")
    assert parse_model_spec("openclip:ViT-B-16/laion2b_s34b_b88k") == ("openclip", "ViT-B-16/laion2b_s34b_b88k")
    with pytest.raises(ModelError, match="not tiny"):
        parse_model_spec("/no/such/dir")


def test_a_pickled_weight_file_in_a_model_folder_runs_nothing(tmp_path):
    """A ``.bin`` whose unpickling would run code: refused with one line, the payload never runs."""
    import json

    import torch

    from radacx_cache.models import DATA, ModelError, load_model

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": json.loads((DATA / "radacx-tiny.json").read_text())}))
    torch.save({"state_dict": Payload()}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelError, match="holds objects other than tensors and was not loaded"):
        load_model(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
