def test_answer_forms_split_exact_empty_and_other(eval_script):
    forms = eval_script("answer_forms")
    c = forms.classify(["Yes", "", "The circle is red", " no.", "  "], ["yes", "no", "circle", "no", "red"])
    # normalize_answer drops case and punctuation: "Yes" and " no." match; blank answers are empty
    assert (c["n"], c["exact"], c["empty"], c["other"]) == (5, 2, 2, 1)
    assert dict(c["first_words"]) == {"yes": 1, "the": 1, "no.": 1}


def test_answer_forms_names_a_missing_checkpoint_before_loading_any(eval_script, capsys, tmp_path):
    import pytest

    forms = eval_script("answer_forms")
    with pytest.raises(SystemExit):  # the existing (empty) folder comes first: loading it would raise otherwise
        forms.main([str(tmp_path), "no_such_cell"])
    assert "no checkpoint 'no_such_cell'" in capsys.readouterr().err
