"""Tests for pathgen.steps.prompts: report splitting, attribute table, prompt frame."""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathgen.errors import ConfigError, PathgenError, ReportError
from pathgen.steps.prompts import (
    DEFAULT_TEMPLATE,
    PROMPT_SCHEMA,
    Report,
    attribute_prompts,
    build_prompts,
    decode_report,
    guess_encoding,
    read_report,
    source_notes,
    with_notes,
    write_prompts,
)
from pathgen.text.attributes import GENERIC, AttributeTable, load_attribute_table, resolve_site
from pathgen.text.sentences import normalize_whitespace, split_report, split_sentences

REQUIRED_SITES = [
    "lung", "breast", "colon", "rectum", "kidney", "prostate", "liver", "stomach",
    "esophagus", "pancreas", "bladder", "uterus", "cervix", "ovary", "thyroid", "skin",
    "brain", "head and neck", "lymph node", "soft tissue", "adrenal gland", "testis",
]  # fmt: skip

# Every TCGA project with a tissue site (TCGA-LAML, blood/bone marrow, has none).
TCGA_PROJECTS = {
    "ACC": "adrenal gland", "BLCA": "bladder", "BRCA": "breast", "CESC": "cervix",
    "CHOL": "bile duct", "COAD": "colon", "DLBC": "lymph node", "ESCA": "esophagus",
    "GBM": "brain", "HNSC": "head and neck", "KICH": "kidney", "KIRC": "kidney",
    "KIRP": "kidney", "LGG": "brain", "LIHC": "liver", "LUAD": "lung", "LUSC": "lung",
    "MESO": "pleura", "OV": "ovary", "PAAD": "pancreas", "PCPG": "adrenal gland",
    "PRAD": "prostate", "READ": "rectum", "SARC": "soft tissue", "SKCM": "skin",
    "STAD": "stomach", "TGCT": "testis", "THCA": "thyroid", "THYM": "thymus",
    "UCEC": "uterus", "UCS": "uterus", "UVM": "eye",
}  # fmt: skip

PARAMS = {"attribute_table": None, "attribute_template": DEFAULT_TEMPLATE, "report_max_words": 50}


@pytest.fixture(scope="module")
def table() -> AttributeTable:
    return load_attribute_table()


def n_words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------
# split_report: known answers


def test_split_short_text_is_one_part():
    assert split_report("  Invasive ductal\ncarcinoma,\tgrade 2.  ") == ["Invasive ductal carcinoma, grade 2."]


def test_split_empty_text_gives_no_parts():
    assert split_report("") == []
    assert split_report(" \n\t ") == []


def test_split_packs_whole_sentences_greedily():
    text = "One two three. Four five six. Seven eight. Nine ten eleven twelve."
    assert split_report(text, max_words=6) == [
        "One two three. Four five six.",
        "Seven eight. Nine ten eleven twelve.",
    ]
    assert split_report(text, max_words=5) == [
        "One two three.",
        "Four five six. Seven eight.",
        "Nine ten eleven twelve.",
    ]
    assert split_report(text, max_words=8) == [
        "One two three. Four five six. Seven eight.",
        "Nine ten eleven twelve.",
    ]


def test_split_protects_abbreviations():
    text = "Tumor cells, e.g. signet ring cells, are seen. Reviewed by Dr. Smith. Margin i.e. Ink Blue."
    parts = split_report(text, max_words=7)
    assert parts == [
        "Tumor cells, e.g. signet ring cells,",
        "are seen. Reviewed by Dr. Smith.",
        "Margin i.e. Ink Blue.",
    ]


@pytest.mark.parametrize(
    "abbrev", ["e.g.", "i.e.", "approx.", "Dr.", "vs.", "cf.", "Approx.", "E.G.", "et al."]
)
def test_abbreviation_is_not_a_boundary(abbrev):
    # Each sentence alone fits; a boundary after the abbreviation would cut "X" off early.
    text = f"Alpha beta {abbrev} Gamma delta. Epsilon zeta eta theta."
    first = f"Alpha beta {abbrev} Gamma delta."
    assert split_report(text, max_words=n_words(first)) == [first, "Epsilon zeta eta theta."]


def test_number_abbreviation_before_a_number_only():
    text = "Block No. 5 shows tumor. Invasion: No. Margins are clear today."
    assert split_report(text, max_words=5) == [
        "Block No. 5 shows tumor.",
        "Invasion: No.",
        "Margins are clear today.",
    ]


def test_decimal_numbers_are_not_boundaries():
    text = "The mass measures 3.5 cm and 0.4 cm from margin. Lymph nodes 2.0 mm."
    assert split_report(text, max_words=10) == [
        "The mass measures 3.5 cm and 0.4 cm from margin.",
        "Lymph nodes 2.0 mm.",
    ]


def test_list_markers_stay_with_their_item():
    text = "1. Adenocarcinoma of lung. 2. Margins free. A. Right lobe: B. Left lobe."
    assert split_report(text, max_words=4) == [
        "1. Adenocarcinoma of lung.",
        "2. Margins free.",
        "A. Right lobe: B.",
        "Left lobe.",
    ]


def test_question_and_exclamation_end_sentences():
    assert split_report("Is it benign? No! Malignant cells.", max_words=3) == [
        "Is it benign?",
        "No! Malignant cells.",
    ]


def test_long_sentence_splits_at_last_comma_that_fits():
    text = "a b c, d e f g, h i j k l m, n o p q."
    # 17 words; first chunk may hold 8: last comma within 8 words is after "g,"
    assert split_report(text, max_words=8) == ["a b c, d e f g,", "h i j k l m,", "n o p q."]


def test_long_sentence_semicolon_counts_like_comma():
    text = "w1 w2 w3 w4; w5 w6 w7 w8 w9 w10."
    assert split_report(text, max_words=6) == ["w1 w2 w3 w4;", "w5 w6 w7 w8 w9 w10."]


def test_long_sentence_without_commas_splits_at_word_boundary():
    words = [f"w{i}" for i in range(12)]
    text = " ".join(words) + "."
    assert split_report(text, max_words=5) == [
        "w0 w1 w2 w3 w4",
        "w5 w6 w7 w8 w9",
        "w10 w11.",
    ]


def test_long_sentence_ignores_a_comma_too_early():
    # a comma after 1 of 6 words would leave a one-word part: cut at the word limit instead
    text = "Tumor, a b c d e f g h i j."
    assert split_report(text, max_words=6) == ["Tumor, a b c d e", "f g h i j."]


def test_tail_of_long_sentence_packs_with_next():
    text = "a b c d e f g h. Short one."
    assert split_report(text, max_words=5) == ["a b c d e", "f g h. Short one."]


def test_max_words_must_be_positive():
    with pytest.raises(ValueError):
        split_report("text", max_words=0)
    with pytest.raises(ValueError):
        split_report("text", max_words=True)


def test_realistic_report_parts_are_short():
    text = (
        "FINAL DIAGNOSIS: A. LUNG, RIGHT UPPER LOBE, LOBECTOMY: Invasive adenocarcinoma, "
        "acinar predominant (approx. 60%), with lepidic (30%) and solid (10%) components. "
        "Tumor size 3.2 x 2.5 x 2.0 cm. Visceral pleural invasion is not identified. "
        "Lymphovascular invasion: Present. Bronchial margin free of tumor (distance approx. 2.1 cm). "
        "Twelve lymph nodes negative for carcinoma (0/12), i.e. pN0. Background lung shows "
        "emphysematous change, anthracotic pigment and intra-alveolar macrophages."
    )
    parts = split_report(text, max_words=25)
    assert " ".join(parts) == normalize_whitespace(text)
    assert all(0 < n_words(p) <= 25 for p in parts)
    assert parts[0].startswith("FINAL DIAGNOSIS: A. LUNG")
    # abbreviations and decimals never end a part
    assert not any(p.endswith(("approx.", "i.e.", "3.2", "2.5")) for p in parts)


# --------------------------------------------------------------------------
# split_report: properties

WORDS = st.sampled_from(
    [
        "tumor", "cells", "Nuclei", "grade", "3.5", "cm", "e.g.", "i.e.", "approx.", "Dr.",
        "No.", "vs.", "1.", "A.", "margin,", "invasion;", "(see", "below).", "\"quoted.\"",
        "pT2N0.", "Negative.", "Is", "it?", "yes!", "lymph", "node", "0/12.", "...", ".",
        ",", "x", "ÉPITHÉLIUM.", "über", "α-SMA", "Ki-67", "20%.", "etc.", ":", "3.",
    ]
)  # fmt: skip
SEPARATORS = st.sampled_from([" ", "  ", "\n", "\t", " \r\n ", "\u00a0", "\u2003"])


@st.composite
def reportish(draw) -> str:
    tokens = draw(st.lists(WORDS, max_size=300))
    out = draw(st.sampled_from(["", " ", "\n"]))
    for token in tokens:
        out += token + draw(SEPARATORS)
    return out


def check_parts(text: str, max_words: int) -> None:
    parts = split_report(text, max_words)
    assert all(part and part == part.strip() for part in parts)
    assert all(1 <= n_words(part) <= max_words for part in parts)
    assert " ".join(parts) == normalize_whitespace(text)
    assert normalize_whitespace(text) == " ".join(text.split())


@settings(max_examples=300, deadline=None)
@given(text=reportish(), max_words=st.integers(min_value=1, max_value=60))
def test_split_properties_on_reportish_text(text, max_words):
    check_parts(text, max_words)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400), max_words=st.integers(min_value=1, max_value=20))
def test_split_properties_on_any_text(text, max_words):
    check_parts(text, max_words)


@settings(max_examples=100, deadline=None)
@given(text=reportish())
def test_split_is_deterministic_and_idempotent(text):
    parts = split_report(text, 12)
    assert split_report(text, 12) == parts
    # re-splitting a part yields the part itself
    assert all(split_report(part, 12) == [part] for part in parts)


# --------------------------------------------------------------------------
# attribute table


def test_packaged_table_covers_required_sites(table):
    missing = [site for site in REQUIRED_SITES if site not in table.sites]
    assert not missing


@pytest.mark.parametrize("site", sorted(load_attribute_table().sites) + [GENERIC])
def test_every_site_has_15_to_25_unique_attributes(table, site):
    attributes = table.attributes(site)
    assert 15 <= len(attributes) <= 25
    assert all(a.strip() and a == normalize_whitespace(a) for a in attributes)
    assert len({a.casefold() for a in attributes}) == len(attributes)
    # short noun phrases, no sentence punctuation, no placeholder braces
    assert all(n_words(a) <= 8 for a in attributes)
    assert not any(a.endswith(".") or "{" in a or "}" in a for a in attributes)


def test_alias_keys_are_lower_case_and_map_to_sites(table):
    for alias, site in table.aliases.items():
        assert alias == alias.lower().strip()
        assert site in table.sites


@pytest.mark.parametrize("code,site", sorted(TCGA_PROJECTS.items()))
def test_every_tcga_project_resolves(table, code, site):
    assert resolve_site(table, "", f"TCGA-{code}") == site
    assert resolve_site(table, "unknown organ", code.lower()) == site  # prefix optional


@pytest.mark.parametrize(
    "tissue,site",
    [
        ("lung", "lung"),
        ("Lung", "lung"),
        ("  Bronchus   and Lung ", "lung"),
        ("colorectal", "colon"),
        ("Large intestine", "colon"),
        ("mammary", "breast"),
        ("Corpus uteri", "uterus"),
        ("endometrium", "uterus"),
        ("head_and_neck", "head and neck"),
        ("Head and Neck", "head and neck"),
        ("Liver and intrahepatic bile ducts", "liver"),
        ("Rectosigmoid junction", "rectum"),
        ("TCGA-KIRP", "kidney"),
    ],
)
def test_tissue_names_and_aliases_resolve(table, tissue, site):
    assert resolve_site(table, tissue, None) == site


def test_tissue_wins_over_project(table):
    assert resolve_site(table, "breast", "TCGA-LUAD") == "breast"
    assert resolve_site(table, "bronchus and lung", "TCGA-BRCA") == "lung"


def test_unknown_tissue_uses_project_then_generic(table):
    assert resolve_site(table, "spleen", "TCGA-COAD") == "colon"
    assert resolve_site(table, "spleen", None) == GENERIC
    assert resolve_site(table, "spleen", "TCGA-LAML") == GENERIC
    assert resolve_site(table, "", "") == GENERIC


def test_generic_fallback_prompts_use_the_given_tissue(table):
    prompts = attribute_prompts(table, "Spleen", None, DEFAULT_TEMPLATE)
    assert prompts[0] == f"An H&E image of spleen tissue showing {table.generic[0]}."
    assert len(prompts) == len(table.generic)
    assert attribute_prompts(table, "", None, DEFAULT_TEMPLATE)[0].startswith("An H&E image of human tissue")


def test_template_rendering(table):
    prompts = attribute_prompts(table, "Bronchus and lung", "TCGA-LUAD", DEFAULT_TEMPLATE)
    assert prompts[0] == "An H&E image of lung tissue showing enlarged nuclei."
    assert len(prompts) == len(table.sites["lung"])
    custom = attribute_prompts(table, "lung", "TCGA-LUSC", "{attribute} in {tissue} ({project})")
    assert custom[0] == "enlarged nuclei in lung (TCGA-LUSC)"
    # no project: placeholder renders empty and whitespace is collapsed
    assert attribute_prompts(table, "lung", None, "{tissue} {project} {attribute}")[0] == "lung enlarged nuclei"


@pytest.mark.parametrize(
    "template", ["{tissue} showing {organ}", "{tissue} {}", "no placeholders", "{attribute", "", 3]
)
def test_bad_templates_raise_config_error(table, template):
    with pytest.raises(ConfigError, match="attribute_template"):
        attribute_prompts(table, "lung", None, template)


def test_load_table_from_file(tmp_path):
    path = tmp_path / "attrs.yaml"
    path.write_text(
        "sites:\n  lung: [enlarged nuclei, acinar pattern]\n"
        "generic: [necrosis]\n"
        "aliases:\n  tcga-luad: lung\n"
    )
    table = load_attribute_table(path)
    assert table.sites == {"lung": ("enlarged nuclei", "acinar pattern")}
    assert table.path == str(path)
    assert resolve_site(table, "x", "TCGA-LUAD") == "lung"
    assert attribute_prompts(table, "x", None, "{attribute}") == ["necrosis"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("sites: [lung]\ngeneric: [x]\n", "sites must be"),
        ("sites:\n  lung: [a]\n", "lacks the key 'generic'"),
        ("sites:\n  lung: []\ngeneric: [x]\n", "sites.lung must be"),
        ("sites:\n  lung: [a, a]\ngeneric: [x]\n", "twice"),
        ("sites:\n  lung: [a, '']\ngeneric: [x]\n", "empty entry"),
        ("sites:\n  Lung: [a]\ngeneric: [x]\n", "lower case"),
        ("sites:\n  lung: [a]\ngeneric: [x]\naliases:\n  tcga-brca: breast\n", "not a site"),
        ("sites:\n  lung: [a]\n  lung: [b]\ngeneric: [x]\n", "duplicate key"),
        ("sites:\n  lung: [a]\ngeneric: [x]\nextra: 1\n", "unknown top-level"),
        ("sites: {lung: [a]\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_table_raises_config_error_naming_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_attribute_table(path)
    assert str(path) in str(info.value)


def test_missing_table_raises_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_attribute_table(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------
# read_report


def test_read_report_returns_text(tmp_path):
    path = tmp_path / "r.txt"
    path.write_bytes("\ufeffTumor   present.\n".encode())
    assert read_report(path, "S1") == Report("Tumor   present.\n", "utf-8", None)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL"),
        (b"text\x00with nul", "NUL"),
        ("Tumour\x00".encode("utf-16-le"), "NUL"),  # UTF-16 without its BOM: NUL bytes, refused as binary
        (codecs.BOM_UTF16_LE + "Tumour".encode("utf-16-le") + b"x", "not valid UTF-16-LE"),
        (codecs.BOM_UTF16_LE + "Tu\x00mour".encode("utf-16-le"), "NUL"),
        (bytes(range(128, 256)), "not valid UTF-8 .* no text encoding explains"),
    ],
)
def test_read_report_bad_content(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    with pytest.raises(ReportError, match=message) as info:
        read_report(path, "SLIDE-7")
    assert str(path) in str(info.value)
    assert "SLIDE-7" in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, PathgenError)


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n  ", codecs.BOM_UTF8, codecs.BOM_UTF8 + b"\n ",
                                     codecs.BOM_UTF16_LE + " \n".encode("utf-16-le"), b"\xa0 \n"])
def test_read_report_empty_or_blank_is_no_report(tmp_path, content, caplog):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pathgen.steps.prompts"):
        report = read_report(path, "SLIDE-8")
    assert report.reason == "empty" and not report.text.strip()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "SLIDE-8" in caplog.text and str(path) in caplog.text


REPORT_CP1252 = "Tumour cells 5 µm, pleomorphic nuclei; résumé"


@pytest.mark.parametrize("codec", ["cp1252", "latin-1"])
def test_read_report_western_code_page_is_read_as_cp1252(tmp_path, codec, caplog):
    path = tmp_path / "r.txt"
    path.write_bytes(REPORT_CP1252.encode(codec))
    with caplog.at_level(logging.WARNING, logger="pathgen.steps.prompts"):
        report = read_report(path, "S1")
    assert report == Report(REPORT_CP1252, "cp1252", None)
    assert "S1" in caplog.text and str(path) in caplog.text and "cp1252" in caplog.text


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_read_report_utf16_with_bom(tmp_path, codec):
    path = tmp_path / "r.txt"
    text = REPORT_CP1252 + " 4 °C; Ki-67 ± 5 %; 腫瘍\n"
    path.write_bytes(("\ufeff" + text).encode(codec))
    assert read_report(path, "S1") == Report(text, codec, None)


@pytest.mark.parametrize(
    "text,codec",
    [
        (REPORT_CP1252, "cp1252"),
        ("Diagnosis: adenocarcinoma. Cells 5 µm.\n", "cp1252"),  # charset-normalizer alone: Big5
        ("µm", "cp1252"),
        ("FINAL DIAGNOSIS: invasive carcinoma, 3 × 2 cm, ½ of the specimen; “necrosis”, 4 °C, Ki-67 ± 5 %. " * 20,
         "cp1252"),
        ("Größe 3 cm. Kerne pleomorph, Zellen 5 µm, Mitosen häufig; Resektionsränder frei. " * 5, "cp1252"),
        ("Células tumorales de 5 µm, núcleos pleomórficos; señal, año.", "cp1252"),
        ("Опухолевые клетки 5 мкм, плеоморфные ядра; заключение. " * 5, "cp1251"),
        ("Komórki nowotworowe 5 µm, pleomorficzne jądra; wnioski, źródło, łąka. " * 5, "cp1250"),
        ("肿瘤细胞 5 mm，多形性核；结论。" * 5, "gb18030"),
    ],
)
def test_guess_encoding_reads_typical_reports(text, codec):
    data = text.encode(codec)
    guessed = guess_encoding(data)
    assert data.decode(guessed) == text
    assert guessed == codecs.lookup(codec).name
    assert decode_report(data) == (text, guessed) and guess_encoding(data) == guessed  # deterministic


def test_read_report_message_names_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_bytes(b"Tumour\x00")
    with pytest.raises(ReportError) as info:
        read_report("data/x.txt", "S")
    assert str(info.value) == "report data/x.txt for slide S contains NUL bytes: a binary file, not a text report"


def test_read_report_missing_or_directory(tmp_path):
    with pytest.raises(ReportError, match="does not exist") as info:
        read_report(tmp_path / "missing.txt", "S2")
    assert "missing.txt" in str(info.value) and "S2" in str(info.value)
    with pytest.raises(ReportError, match="directory"):
        read_report(tmp_path, "S2")


def test_read_report_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("Tumour.")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ReportError, match="cannot be read: Permission denied") as info:
        read_report(path, "S3")
    assert str(path) in str(info.value) and "S3" in str(info.value)


def test_source_notes():
    assert source_notes("r.txt") == ("r.txt", {})
    assert source_notes("r.txt;encoding=cp1252") == ("r.txt", {"encoding": "cp1252"})
    assert source_notes("llm:abc:report:r.txt;encoding=utf-16-le") == ("llm:abc:report:r.txt",
                                                                        {"encoding": "utf-16-le"})
    assert source_notes("table:lung;no-report=empty:r.txt") == ("table:lung", {"no-report": "empty:r.txt"})
    both = with_notes("llm:abc:attributes", encoding="cp1252", no_report="empty:r.txt")
    assert both == "llm:abc:attributes;encoding=cp1252;no-report=empty:r.txt"
    assert source_notes(both) == ("llm:abc:attributes", {"encoding": "cp1252", "no-report": "empty:r.txt"})
    assert list(source_notes(both)[1]) == ["encoding", "no-report"]  # in written order


# --------------------------------------------------------------------------
# build_prompts / write_prompts


def test_build_prompts_schema_and_order(tmp_path, table):
    report = tmp_path / "reports" / "TCGA-XX-0001.txt"
    report.parent.mkdir()
    report.write_text("Invasive adenocarcinoma. " * 30)
    frame = build_prompts("TCGA-XX-0001-01Z", "Bronchus and lung", "TCGA-LUAD", str(report), PARAMS)

    assert frame.schema == pl.Schema(PROMPT_SCHEMA)
    assert frame.columns == ["slide_id", "kind", "index", "text", "source"]
    kinds = frame["kind"].to_list()
    n_report = kinds.count("report")
    assert n_report == 2  # 60 words in 50-word parts
    assert kinds == ["report"] * n_report + ["attribute"] * len(table.sites["lung"])
    assert frame.filter(pl.col("kind") == "report")["index"].to_list() == list(range(n_report))
    attr = frame.filter(pl.col("kind") == "attribute")
    assert attr["index"].to_list() == list(range(attr.height))
    assert set(frame["slide_id"]) == {"TCGA-XX-0001-01Z"}
    assert set(frame.filter(pl.col("kind") == "report")["source"]) == {"TCGA-XX-0001.txt"}
    assert set(attr["source"]) == {"table:lung"}
    assert " ".join(frame.filter(pl.col("kind") == "report")["text"]) == normalize_whitespace(report.read_text())
    assert not any(str(tmp_path) in s for s in frame["source"])


def test_build_prompts_without_report(table):
    for report_path in (None, ""):
        frame = build_prompts("S", "spleen", None, report_path, PARAMS)
        assert set(frame["kind"]) == {"attribute"}
        assert set(frame["source"]) == {"table:generic"}
        assert frame.height == len(table.generic)


def test_build_prompts_is_deterministic(tmp_path):
    report = tmp_path / "r.txt"
    report.write_text("Tumor present. Margins clear.")
    a = build_prompts("S", "colon", "TCGA-COAD", str(report), PARAMS)
    b = build_prompts("S", "colon", "TCGA-COAD", str(report), PARAMS)
    assert a.equals(b)
    write_prompts(a, tmp_path / "a.parquet")
    write_prompts(b, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert pl.read_parquet(tmp_path / "a.parquet").equals(a)


def test_build_prompts_report_error_propagates(tmp_path):
    with pytest.raises(ReportError, match="slide S9 does not exist"):
        build_prompts("S9", "lung", None, str(tmp_path / "missing.txt"), PARAMS)
    report = tmp_path / "binary.txt"
    report.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ReportError, match="slide S9 contains NUL bytes"):
        build_prompts("S9", "lung", None, str(report), PARAMS)


@pytest.mark.parametrize("content", [b"", b" \n\t \n"])
def test_build_prompts_empty_report_gives_attribute_prompts_only(tmp_path, table, content, caplog):
    report = tmp_path / "TCGA-XX-0002.txt"
    report.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pathgen.steps.prompts"):
        frame = build_prompts("S9", "lung", None, str(report), PARAMS)
    assert frame.schema == pl.Schema(PROMPT_SCHEMA)
    assert set(frame["kind"]) == {"attribute"} and frame.height == len(table.sites["lung"])
    assert set(frame["source"]) == {"table:lung;no-report=empty:TCGA-XX-0002.txt"}
    assert source_notes(frame["source"][0]) == ("table:lung", {"no-report": "empty:TCGA-XX-0002.txt"})
    no_report = build_prompts("S9", "lung", None, None, PARAMS)
    assert frame["text"].to_list() == no_report["text"].to_list()  # the prompts of a slide without a report
    assert "S9" in caplog.text and str(report) in caplog.text


def test_cli_prompts_empty_report_succeeds_with_attribute_prompts(tmp_path):
    from pathgen.cli import main

    report = tmp_path / "blank.txt"
    report.write_text("\n   \n")
    out = tmp_path / "p.parquet"
    argv = ["prompts", "--slide-id", "S", "--tissue", "lung", "--project", "TCGA-LUAD", "--report", str(report),
            "--params-json", json.dumps({"prompts": {**PARAMS, "llm": None}}), "--out", str(out)]
    assert main(argv) == 0
    frame = pl.read_parquet(out)
    assert set(frame["kind"]) == {"attribute"} and set(frame["source"]) == {"table:lung;no-report=empty:blank.txt"}


def test_build_prompts_records_the_encoding(tmp_path):
    report = tmp_path / "r.txt"
    text = "Tumour cells 5 µm, pleomorphic nuclei; résumé. Fixed at 4 °C. " * 10
    report.write_bytes(text.encode("cp1252"))
    frame = build_prompts("S", "colon", None, str(report), PARAMS)
    reports = frame.filter(pl.col("kind") == "report")
    assert set(reports["source"]) == {"r.txt;encoding=cp1252"}
    assert " ".join(reports["text"]) == normalize_whitespace(text)
    assert set(frame.filter(pl.col("kind") == "attribute")["source"]) == {"table:colon"}
    write_prompts(frame, tmp_path / "a.parquet")
    write_prompts(build_prompts("S", "colon", None, str(report), PARAMS), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    report.write_bytes(("\ufeff" + text).encode("utf-16-le"))
    frame = build_prompts("S", "colon", None, str(report), PARAMS)
    assert set(frame.filter(pl.col("kind") == "report")["source"]) == {"r.txt;encoding=utf-16-le"}


def test_build_prompts_uses_params(tmp_path):
    table = tmp_path / "t.yaml"
    table.write_text("sites:\n  lung: [a, b]\ngeneric: [g]\n")
    report = tmp_path / "r.txt"
    report.write_text("One two three. Four five six.")
    frame = build_prompts(
        "S",
        "lung",
        None,
        str(report),
        {"attribute_table": str(table), "attribute_template": "{attribute} of {tissue}", "report_max_words": 3},
    )
    assert frame["text"].to_list() == ["One two three.", "Four five six.", "a of lung", "b of lung"]


def test_build_prompts_defaults_missing_params():
    frame = build_prompts("S", "lung", None, None, {})
    assert frame["text"][0] == "An H&E image of lung tissue showing enlarged nuclei."


@pytest.mark.parametrize(
    "params,message",
    [
        ({**PARAMS, "report_max_words": 0}, "report_max_words"),
        ({**PARAMS, "report_max_words": "50"}, "report_max_words"),
        ({**PARAMS, "attribute_template": "{organ}"}, "attribute_template"),
        ({**PARAMS, "attribute_table": 5}, "attribute_table"),
        ({**PARAMS, "max_word": 5}, "unknown keys: max_word"),
    ],
)
def test_build_prompts_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        build_prompts("S", "lung", None, None, params)


# --------------------------------------------------------------------------
# LLM-written prompts (prompts.llm), with a real tiny random GGUF

import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import yaml  # noqa: E402

from pathgen.config import load_params, params_schema, validate_params  # noqa: E402
from pathgen.models.engine import Agent  # noqa: E402
from pathgen.steps.prompts import (  # noqa: E402
    CACHE_AGENT,
    CHAT_OVERHEAD_TOKENS,
    DEFAULT_ATTRIBUTES_PROMPT,
    DEFAULT_CLEAN_PROMPT,
    clean_report,
    estimate_tokens,
    fill_template,
    llm_attributes,
    make_llm_agent,
    prompt_budget,
    prompt_params,
    report_chunks,
    token_counter,
)
from pathgen.store.cache import ItemCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLM_TOKENS = 160  # enough for a JSON answer from the tiny model; keeps the tests quick
REPORTS = [
    "Lung, left upper lobe, lobectomy: invasive adenocarcinoma, acinar predominant, moderately "
    "differentiated. Tumor size 3.2 cm. Margins negative. Lymph nodes 0/12.",
    "Colon, sigmoid: adenocarcinoma with mucinous features invading the muscularis propria. "
    "No lymphovascular invasion.",
]


@pytest.fixture(scope="module")
def llm_cfg(tmp_path_factory) -> dict:
    from pathgen.demo.tiny_models import build_tiny_gguf

    gguf = build_tiny_gguf(tmp_path_factory.mktemp("tiny-llm") / "tiny-llm.gguf", seed=0)
    return {
        "checkpoint": str(gguf), "clean_prompt": DEFAULT_CLEAN_PROMPT, "attributes_prompt": DEFAULT_ATTRIBUTES_PROMPT,
        "n_attributes": 20, "max_tokens": LLM_TOKENS, "temperature": 0.0, "seed": 0, "n_ctx": 2048,
    }


@pytest.fixture(scope="module")
def agent(llm_cfg) -> Agent:
    return make_llm_agent(llm_cfg, threads=1)


def count_calls(monkeypatch, target, answer=None) -> list:
    """Wrap `target.chat` (an agent or the class) to record its calls; answer with `answer` when given."""
    calls = []
    original = target.chat

    def chat(*args, **kwargs):
        calls.append(args)
        if answer is not None:
            return answer(*args, **kwargs) if callable(answer) else answer
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "chat", chat)
    return calls


def test_fill_template_is_one_pass_and_keeps_other_braces():
    template = 'Answer as {"findings": [...]}. Report: {report} ({max_words} words)'
    filled = fill_template(template, {"report": "has {max_words} and {tissue}", "max_words": "50"})
    assert filled == 'Answer as {"findings": [...]}. Report: has {max_words} and {tissue} (50 words)'


def test_clean_report_parts_are_bounded_and_deterministic(llm_cfg, agent):
    other = make_llm_agent(llm_cfg, threads=1)  # another load of the same model
    assert other.fingerprint == agent.fingerprint
    for report in REPORTS:
        a = clean_report(agent, None, report, 12)
        b = clean_report(other, None, report, 12)
        assert a == b and a.fallback == b.fallback  # greedy: same answer from another load
        assert a and all(part and part == part.strip() and len(part.split()) <= 12 for part in a)
        if a.fallback:
            assert a == split_report(report, 12) and a.reason


def test_clean_report_splits_validates_and_drops_unusable_findings(agent, monkeypatch):
    long_finding = " ".join(["Atypical glands infiltrate desmoplastic stroma,"] * 12)  # 60 words
    answer = json.dumps({"findings": ["  Acinar   pattern\u0007 with necrosis. ", "", "\ufffd", 7, long_finding]})
    count_calls(monkeypatch, agent, answer)
    parts = clean_report(agent, None, REPORTS[0], 50)
    assert not parts.fallback and parts.reason is None
    assert parts == ["Acinar pattern with necrosis.", *split_report(long_finding, 50)]
    assert all(len(p.split()) <= 50 for p in parts) and len(parts) == 3


def test_clean_report_second_call_hits_the_cache(tmp_path, agent, monkeypatch):
    calls = count_calls(monkeypatch, agent)
    with ItemCache(tmp_path, CACHE_AGENT, agent.fingerprint) as cache:
        first = clean_report(agent, cache, REPORTS[1], 20)
        assert len(calls) == 1 and cache.stats.misses == 1 and cache.stats.puts == 1
        second = clean_report(agent, cache, REPORTS[1], 20)
        assert len(calls) == 1 and cache.stats.hits == 1
        assert second == first and second.fallback == first.fallback
        # the cached value is the raw answer; the word limit applies afterwards
        assert clean_report(agent, cache, REPORTS[1], 8, template="{report}") is not None
        assert len(calls) == 2  # another template: another prompt, a miss
    with ItemCache(tmp_path, CACHE_AGENT, agent.fingerprint) as reopened:  # on disk for the next job
        assert clean_report(agent, reopened, REPORTS[1], 20) == first
        assert reopened.stats.hits == 1 and len(calls) == 2
        clean_report(agent, reopened, REPORTS[0], 20)  # another report: a miss
        assert reopened.stats.misses == 1 and len(calls) == 3


def test_clean_report_invalid_answer_falls_back_to_splitting(tmp_path, agent, monkeypatch):
    calls = count_calls(monkeypatch, agent, "not json")
    with ItemCache(tmp_path, CACHE_AGENT, agent.fingerprint) as cache:
        parts = clean_report(agent, cache, REPORTS[0], 10)
        assert parts.fallback and "not a JSON object" in parts.reason
        assert parts == split_report(REPORTS[0], 10)
        again = clean_report(agent, cache, REPORTS[0], 10)  # the unusable answer is cached too
        assert again.fallback and again == parts and len(calls) == 1 and cache.stats.hits == 1
    for answer in ('{"findings": []}', '{"findings": ["", " ", 3]}', '{"parts": ["x"]}', '["x"]'):
        monkeypatch.setattr(agent, "chat", lambda *a, answer=answer, **k: answer)
        parts = clean_report(agent, None, REPORTS[0], 10)
        assert parts.fallback and parts == split_report(REPORTS[0], 10), answer


SMALL_CTX = {"n_ctx": 1024, "max_tokens": 48}  # a few chunks of a long report, quickly
LONG_REPORT = " ".join(f"Block {i}: " + REPORTS[i % 2] for i in range(60))  # about 1900 words


@pytest.fixture(scope="module")
def small_agent(llm_cfg) -> Agent:
    return make_llm_agent({**llm_cfg, **SMALL_CTX}, threads=1)


def chunk_of(prompt: str) -> str:
    """The report chunk in a prompt made from DEFAULT_CLEAN_PROMPT."""
    return prompt.rsplit("Report: ", 1)[1]


def real_model_then(monkeypatch, target, answer) -> list:
    """Make `target.chat` run the real model on each prompt (llama.cpp refuses one that does not fit
    its context) for one token, then answer `answer(prompt, schema)`; return the prompts asked."""
    prompts = []
    original = target.chat
    bound = not isinstance(target, type)

    def chat(*args, schema=None):
        prompt = args[0] if bound else args[1]
        prompts.append(prompt)
        original(*args[:-1], 1, schema=schema)  # raises ValueError when the prompt exceeds n_ctx
        return answer(prompt, schema)

    monkeypatch.setattr(target, "chat", chat)
    return prompts


def findings_of(prompt: str, schema=None) -> str:
    """A usable answer naming its chunk: the chunk's first eight words."""
    if schema is not None and "attributes" in schema["properties"]:
        return json.dumps({"attributes": ["nuclear atypia", "necrosis", "gland formation"]})
    return json.dumps({"findings": [" ".join(chunk_of(prompt).split()[:8])]})


def test_report_chunks_fit_the_context_at_sentence_boundaries(small_agent):
    chunks = report_chunks(small_agent, LONG_REPORT, 50)
    assert len(chunks) >= 3
    assert " ".join(chunks) == normalize_whitespace(LONG_REPORT)
    assert [s for chunk in chunks for s in split_sentences(chunk)] == split_sentences(LONG_REPORT)
    budget = SMALL_CTX["n_ctx"] - SMALL_CTX["max_tokens"] - CHAT_OVERHEAD_TOKENS
    assert prompt_budget(small_agent) == budget
    for chunk in chunks:
        prompt = fill_template(DEFAULT_CLEAN_PROMPT, {"report": chunk, "max_words": "50"})
        n = len(small_agent.engine.llm.tokenize(prompt.encode(), add_bos=True, special=False))
        assert n <= budget + 1, (n, budget)  # + the BOS counted here
    # not too small either: each chunk but the last is refused one more sentence
    for chunk, following in zip(chunks, chunks[1:]):
        grown = chunk + " " + split_sentences(following)[0]
        prompt = fill_template(DEFAULT_CLEAN_PROMPT, {"report": grown, "max_words": "50"})
        assert token_counter(small_agent)(prompt) > budget - 2 * len(split_sentences(grown))
    assert report_chunks(small_agent, REPORTS[0], 50) == [normalize_whitespace(REPORTS[0])]  # fits: as before


def test_report_chunks_cut_an_overlong_sentence_between_words(small_agent):
    sentence = " ".join(f"cell{i}" for i in range(600)) + "."  # one sentence, far beyond the context
    chunks = report_chunks(small_agent, "Short start. " + sentence, 50)
    assert len(chunks) >= 2 and chunks[0].startswith("Short start. cell0")
    assert " ".join(chunks) == normalize_whitespace("Short start. " + sentence)
    budget = prompt_budget(small_agent)
    count = token_counter(small_agent)
    assert all(count(fill_template(DEFAULT_CLEAN_PROMPT, {"report": c, "max_words": "50"})) <= budget for c in chunks)


def test_report_chunks_without_a_tokenizer_use_the_estimate():
    fake = SimpleNamespace(settings={"n_ctx": 600, "max_tokens": 64})  # no token_counter: no tokenizer
    assert token_counter(fake) is estimate_tokens
    assert estimate_tokens("abcd") == 2 and estimate_tokens("2024") == 4 and estimate_tokens("µm") == 3
    chunks = report_chunks(fake, LONG_REPORT, 50, template="Clean: {report}")
    budget = 600 - 64 - CHAT_OVERHEAD_TOKENS
    assert len(chunks) > 1 and " ".join(chunks) == normalize_whitespace(LONG_REPORT)
    assert all(estimate_tokens("Clean: " + c) <= budget for c in chunks)
    assert report_chunks(SimpleNamespace(settings={}), LONG_REPORT, 50) == [normalize_whitespace(LONG_REPORT)]


def test_clean_report_long_report_in_chunks_uses_the_llm(tmp_path, small_agent, monkeypatch):
    prompts = real_model_then(monkeypatch, small_agent, findings_of)
    chunks = report_chunks(small_agent, LONG_REPORT, 50)
    with ItemCache(tmp_path, CACHE_AGENT, small_agent.fingerprint) as cache:
        parts = clean_report(small_agent, cache, LONG_REPORT, 50)
        assert cache.stats.misses == len(chunks) and cache.stats.puts == len(chunks)  # one item per chunk prompt
    assert not parts.fallback and parts.reason is None and parts.item_fallback == [False] * len(parts)
    assert parts.chunks == chunks and [chunk_of(p) for p in prompts] == chunks
    assert parts == [" ".join(chunk.split()[:8]) for chunk in chunks]  # the findings, in report order
    with ItemCache(tmp_path, CACHE_AGENT, small_agent.fingerprint) as cache:
        assert clean_report(small_agent, cache, LONG_REPORT, 50) == parts
        assert cache.stats.hits == len(chunks) and len(prompts) == len(chunks)  # all from the cache


def test_clean_report_falls_back_per_chunk(small_agent, monkeypatch):
    chunks = report_chunks(small_agent, LONG_REPORT, 50)
    bad = chunk_of(fill_template(DEFAULT_CLEAN_PROMPT, {"report": chunks[1], "max_words": "50"}))
    real_model_then(monkeypatch, small_agent,
                    lambda prompt, schema: "not json" if chunk_of(prompt) == bad else findings_of(prompt))
    parts = clean_report(small_agent, None, LONG_REPORT, 50)
    plain = split_report(chunks[1], 50)
    assert parts == [" ".join(chunks[0].split()[:8]), *plain, *(" ".join(c.split()[:8]) for c in chunks[2:])]
    assert parts.item_fallback == [False] + [True] * len(plain) + [False] * (len(chunks) - 2)
    assert parts.fallback and parts.reason.startswith(f"chunk 2/{len(chunks)}: the answer is not a JSON object")
    monkeypatch.setattr(small_agent, "chat", lambda *a, **k: "not json")  # no chunk usable: the plain output
    parts = clean_report(small_agent, None, LONG_REPORT, 50)
    assert parts.fallback and parts == split_report(LONG_REPORT, 50) and all(parts.item_fallback)


def test_clean_report_falls_back_when_no_chunk_fits(agent):
    template = "word " * 2500 + "Report: {report}"  # the template alone is beyond n_ctx 2048
    assert report_chunks(agent, LONG_REPORT, 50, template=template) == [normalize_whitespace(LONG_REPORT)]
    parts = clean_report(agent, None, LONG_REPORT, 50, template=template)
    assert parts.fallback and "could not answer" in parts.reason
    assert parts == split_report(LONG_REPORT, 50)


def test_build_prompts_long_report_rows_come_from_the_llm(tmp_path, llm_cfg, small_agent, monkeypatch):
    report = tmp_path / "long.txt"
    report.write_bytes(LONG_REPORT.replace("3.2 cm", "3.2 cm (5 µm sections)").encode("cp1252"))
    prompts = real_model_then(monkeypatch, Agent, findings_of)
    params = {**PARAMS, "llm": {**llm_cfg, **SMALL_CTX, "n_attributes": 3}}
    frame = build_prompts("S4", "lung", "TCGA-LUAD", str(report), params, threads=1)
    reports = frame.filter(pl.col("kind") == "report")
    chunks = report_chunks(small_agent, report.read_bytes().decode("cp1252"), 50)
    assert len(chunks) >= 3 and len(prompts) == len(chunks) + 1  # the chunks, then the attributes
    assert reports["text"].to_list() == [" ".join(c.split()[:8]) for c in chunks]
    tag = f"llm:{small_agent.fingerprint[:12]}"
    assert set(reports["source"]) == {f"{tag}:report:long.txt;encoding=cp1252"}
    assert set(frame.filter(pl.col("kind") == "attribute")["source"]) == {f"{tag}:attributes"}


def test_llm_attributes_from_the_tiny_model(agent, table):
    for tissue, project, count in (("lung", "TCGA-LUAD", 20), ("colon", "TCGA-COAD", 2), ("spleen", None, 3)):
        attrs = llm_attributes(agent, None, tissue, project, count)
        if attrs.fallback:
            assert attrs == list(table.attributes(resolve_site(table, tissue, project))) and attrs.reason
        else:
            assert count / 2 <= len(attrs) <= count
            assert len({a.casefold() for a in attrs}) == len(attrs) and all(a.strip() for a in attrs)


def test_llm_attributes_are_cleaned_deduplicated_and_trimmed(agent, monkeypatch, table):
    answer = json.dumps({"attributes": ["1. Nuclear atypia.", "nuclear ATYPIA", "- Necrosis", "", 5,
                                        " ".join(["word"] * 40), "Mitoses;", "Gland formation", "Stroma"]})
    calls = count_calls(monkeypatch, agent, answer)
    attrs = llm_attributes(agent, None, "lung", "TCGA-LUAD", 4)
    assert not attrs.fallback
    assert attrs == ["Nuclear atypia", "Necrosis", "Mitoses", "Gland formation"]
    prompt = calls[0][0]
    assert prompt == ("This image is a tissue patch from a lung whole slide image of TCGA-LUAD. Please list 4 "
                      "pathological features or attributes that might appear in this type of whole slide image.")
    # fewer than half of `count` usable: the static table
    attrs = llm_attributes(agent, None, "lung", "TCGA-LUAD", 20)
    assert attrs.fallback and "fewer than half" in attrs.reason
    assert attrs == list(table.sites["lung"])
    monkeypatch.setattr(agent, "chat", lambda *a, **k: "not json")
    attrs = llm_attributes(agent, None, "spleen", None, 20)
    assert attrs.fallback and attrs == list(table.generic)


def test_llm_attributes_are_cached_per_tissue_and_project(tmp_path, agent, monkeypatch):
    calls = count_calls(monkeypatch, agent, lambda prompt, *a, **k: json.dumps({"attributes": [prompt[:20], "b"]}))
    with ItemCache(tmp_path, CACHE_AGENT, agent.fingerprint) as cache:
        first = llm_attributes(agent, cache, "lung", "TCGA-LUAD", 2)
        assert llm_attributes(agent, cache, "lung", "TCGA-LUAD", 2) == first and cache.stats.hits == 1
        assert llm_attributes(agent, cache, "lung", "TCGA-LUAD", 1) == first[:1]  # other count: other prompt
        llm_attributes(agent, cache, "lung", "TCGA-LUSC", 2)
        llm_attributes(agent, cache, "breast", "TCGA-LUAD", 2)
        assert len(calls) == 4 and cache.stats.hits == 1


def expected_frame_without_llm(slide_id, tissue, project, report_path, max_words=50):
    """The prompts frame as the step made it before prompts.llm existed."""
    table = load_attribute_table()
    rows = []
    if report_path:
        for i, part in enumerate(split_report(read_report(report_path, slide_id).text, max_words)):
            rows.append((slide_id, "report", i, part, Path(report_path).name))
    site = resolve_site(table, tissue, project)
    for i, prompt in enumerate(attribute_prompts(table, tissue, project, DEFAULT_TEMPLATE)):
        rows.append((slide_id, "attribute", i, prompt, f"table:{site}"))
    return pl.DataFrame(rows, schema=PROMPT_SCHEMA, orient="row")


@pytest.mark.parametrize("tissue,project,with_report", [("Bronchus and lung", "TCGA-LUAD", True),
                                                        ("spleen", None, False), ("", "TCGA-COAD", True)])
def test_build_prompts_without_llm_is_byte_identical(tmp_path, tissue, project, with_report):
    report = tmp_path / "TCGA-AB-0001.txt"
    report.write_text("Invasive adenocarcinoma, acinar. Margins are free.\n" * 12)
    path = str(report) if with_report else None
    expected = expected_frame_without_llm("S1", tissue, project, path)
    write_prompts(expected, tmp_path / "expected.parquet")
    for params in (PARAMS, {**PARAMS, "llm": None}):
        frame = build_prompts("S1", tissue, project, path, params, cache_dir=tmp_path / "cache")
        write_prompts(frame, tmp_path / "got.parquet")
        assert (tmp_path / "got.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
    assert not (tmp_path / "cache").exists()  # no model, no cache


def test_build_prompts_with_llm_writes_llm_rows(tmp_path, llm_cfg, agent, monkeypatch, table):
    report = tmp_path / "reports" / "TCGA-AB-0002.txt"
    report.parent.mkdir()
    report.write_text(REPORTS[0])
    params = {**PARAMS, "llm": llm_cfg}
    calls = count_calls(monkeypatch, Agent)
    frame = build_prompts("S2", "Bronchus and lung", "TCGA-LUAD", str(report), params, cache_dir=tmp_path / "cache",
                          threads=1)
    assert len(calls) == 2  # one report, one tissue
    assert frame.schema == pl.Schema(PROMPT_SCHEMA)
    tag = f"llm:{agent.fingerprint[:12]}"
    reports, attrs = frame.filter(pl.col("kind") == "report"), frame.filter(pl.col("kind") == "attribute")
    assert reports.height >= 1 and attrs.height >= 10
    assert reports["index"].to_list() == list(range(reports.height))
    assert attrs["index"].to_list() == list(range(attrs.height))
    assert set(reports["source"]) <= {f"{tag}:report:TCGA-AB-0002.txt", "llm-fallback:report:TCGA-AB-0002.txt"}
    assert set(attrs["source"]) <= {f"{tag}:attributes", "llm-fallback:table:lung"}
    assert all(len(t.split()) <= 50 for t in reports["text"])
    assert all(t.startswith("An H&E image of lung tissue showing ") for t in attrs["text"])
    if attrs["source"][0].startswith("llm-fallback"):
        assert attrs.height == len(table.sites["lung"])
    write_prompts(frame, tmp_path / "a.parquet")
    # a rerun (another job) reads everything from the cache and writes the same bytes
    again = build_prompts("S2", "Bronchus and lung", "TCGA-LUAD", str(report), params, cache_dir=tmp_path / "cache")
    assert len(calls) == 2
    write_prompts(again, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_build_prompts_llm_sources_for_usable_and_unusable_answers(tmp_path, llm_cfg, agent, monkeypatch):
    report = tmp_path / "r.txt"
    report.write_text(REPORTS[1])
    good = {"findings": ["Mucinous adenocarcinoma invades the muscularis propria."],
            "attributes": ["extracellular mucin", "dirty necrosis", "goblet cells"]}
    count_calls(monkeypatch, Agent,
                lambda self, prompt, max_tokens, schema=None: json.dumps({k: good[k] for k in schema["properties"]}))
    params = {**PARAMS, "llm": {**llm_cfg, "n_attributes": 3}}
    frame = build_prompts("S3", "colon", "TCGA-COAD", str(report), params)  # no cache_dir: not cached
    tag = f"llm:{agent.fingerprint[:12]}"
    assert frame.rows() == [
        ("S3", "report", 0, "Mucinous adenocarcinoma invades the muscularis propria.", f"{tag}:report:r.txt"),
        ("S3", "attribute", 0, "An H&E image of colon tissue showing extracellular mucin.", f"{tag}:attributes"),
        ("S3", "attribute", 1, "An H&E image of colon tissue showing dirty necrosis.", f"{tag}:attributes"),
        ("S3", "attribute", 2, "An H&E image of colon tissue showing goblet cells.", f"{tag}:attributes"),
    ]
    monkeypatch.setattr(Agent, "chat", lambda self, *a, **k: "not json")
    frame = build_prompts("S3", "colon", "TCGA-COAD", str(report), params)
    assert set(frame.filter(pl.col("kind") == "report")["source"]) == {"llm-fallback:report:r.txt"}
    assert set(frame.filter(pl.col("kind") == "attribute")["source"]) == {"llm-fallback:table:colon"}
    plain = build_prompts("S3", "colon", "TCGA-COAD", str(report), PARAMS)
    assert frame["text"].to_list() == plain["text"].to_list()  # the fallback is today's output


def test_cli_prompts_with_llm_uses_the_cache_dir(tmp_path, llm_cfg, monkeypatch):
    from pathgen.cli import main

    report = tmp_path / "r.txt"
    report.write_text(REPORTS[0])
    view = json.dumps({"prompts": {**PARAMS, "llm": llm_cfg}})
    calls = count_calls(monkeypatch, Agent, lambda *a, **k: "not json")
    argv = ["prompts", "--slide-id", "S", "--tissue", "lung", "--project", "TCGA-LUAD", "--report", str(report),
            "--params-json", view, "--cache-dir", str(tmp_path / "cache"), "--flush-every", "1",
            "--out", str(tmp_path / "p.parquet")]
    assert main(argv) == 0
    assert len(calls) == 2 and list((tmp_path / "cache" / CACHE_AGENT).glob("*/seg-*.jsonl"))
    assert main(argv) == 0 and len(calls) == 2  # second run: from the cache
    assert set(pl.read_parquet(tmp_path / "p.parquet")["source"]) == {"llm-fallback:report:r.txt",
                                                                      "llm-fallback:table:lung"}


def test_shipped_params_example_llm_is_valid_and_uses_the_papers_prompts():
    params = load_params(ROOT / "params.yaml")
    assert params["prompts"]["llm"] is None
    lines = (ROOT / "params.yaml").read_text().splitlines()
    start = lines.index("  # llm:")
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line.replace("# ", "", 1) if "# " in line else line.replace("#", "", 1).rstrip())
    example = yaml.safe_load("\n".join(block))["llm"]
    assert example["clean_prompt"] == DEFAULT_CLEAN_PROMPT
    assert example["attributes_prompt"] == DEFAULT_ATTRIBUTES_PROMPT
    assert example["n_attributes"] == 20 and example["max_tokens"] == 512
    validate_params({**params, "prompts": {**params["prompts"], "llm": example}})
    assert prompt_params({**params["prompts"], "llm": example})["llm"] == example
    schema_keys = params_schema()["properties"]["prompts"]["properties"]["llm"]["required"]
    assert sorted(schema_keys) == sorted(example)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda llm: "model.gguf", "must be null or a mapping"),
        (lambda llm: {k: v for k, v in llm.items() if k != "seed"}, "lacks the keys: seed"),
        (lambda llm: {**llm, "top_p": 0.9}, "unknown keys: top_p"),
        (lambda llm: {**llm, "clean_prompt": "Clean this."}, r"clean_prompt .* lacks the \{report\}"),
        (lambda llm: {**llm, "attributes_prompt": "List {count}."}, r"lacks the \{tissue\}"),
        (lambda llm: {**llm, "n_attributes": 0}, "n_attributes must be an integer >= 1"),
        (lambda llm: {**llm, "max_tokens": True}, "max_tokens"),
        (lambda llm: {**llm, "temperature": -0.1}, "temperature"),
        (lambda llm: {**llm, "checkpoint": ""}, "checkpoint"),
    ],
)
def test_bad_llm_params_raise_config_error(edit, message):
    llm = {"checkpoint": "m.gguf", "clean_prompt": DEFAULT_CLEAN_PROMPT, "attributes_prompt": DEFAULT_ATTRIBUTES_PROMPT,
           "n_attributes": 20, "max_tokens": 512, "temperature": 0.0, "seed": 0, "n_ctx": 2048}
    with pytest.raises(ConfigError, match=message):
        prompt_params({**PARAMS, "llm": edit(llm)})


def test_missing_llm_checkpoint_is_a_model_error(tmp_path):
    llm = {"checkpoint": str(tmp_path / "none.gguf"), "clean_prompt": DEFAULT_CLEAN_PROMPT,
           "attributes_prompt": DEFAULT_ATTRIBUTES_PROMPT, "n_attributes": 20, "max_tokens": 512,
           "temperature": 0.0, "seed": 0, "n_ctx": 2048}
    with pytest.raises(PathgenError, match="none.gguf"):
        build_prompts("S", "lung", None, None, {**PARAMS, "llm": llm})
