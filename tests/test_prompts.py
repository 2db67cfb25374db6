"""Tests for pathgen.prompts: report splitting, attribute table, prompt frame."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathgen.errors import ConfigError, PathgenError, ReportError
from pathgen.prompts import (
    DEFAULT_TEMPLATE,
    GENERIC,
    PROMPT_SCHEMA,
    AttributeTable,
    attribute_prompts,
    build_prompts,
    load_attribute_table,
    normalize_whitespace,
    read_report,
    resolve_site,
    split_report,
    write_prompts,
)

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
    assert read_report(path, "S1") == "Tumor   present.\n"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"  \n\t\r\n  ", "is empty"),
        (b"\xff\xfe\x00\x01binary\x89PNG", "not valid UTF-8"),
        (b"text\x00with nul", "NUL"),
    ],
)
def test_read_report_bad_content(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    with pytest.raises(ReportError, match=message) as info:
        read_report(path, "SLIDE-7")
    assert str(path) in str(info.value)
    assert "SLIDE-7" in str(info.value)
    assert isinstance(info.value, PathgenError)


def test_read_report_message_names_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("   ")
    with pytest.raises(ReportError) as info:
        read_report("data/x.txt", "S")
    assert str(info.value) == "report data/x.txt for slide S is empty"


def test_read_report_missing_or_directory(tmp_path):
    with pytest.raises(ReportError, match="does not exist") as info:
        read_report(tmp_path / "missing.txt", "S2")
    assert "missing.txt" in str(info.value) and "S2" in str(info.value)
    with pytest.raises(ReportError, match="directory"):
        read_report(tmp_path, "S2")


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
    report = tmp_path / "empty.txt"
    report.write_text("")
    with pytest.raises(ReportError, match="slide S9 is empty"):
        build_prompts("S9", "lung", None, str(report), PARAMS)


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
