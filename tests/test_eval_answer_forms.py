def test_answer_forms_split_exact_empty_and_other(eval_script):
    forms = eval_script("answer_forms")
    c = forms.classify(["Yes", "", "The circle is red", " no.", "  "], ["yes", "no", "circle", "no", "red"])
    # normalize_answer drops case and punctuation: "Yes" and " no." match; blank answers are empty
    assert (c["n"], c["exact"], c["empty"], c["other"]) == (5, 2, 2, 1)
    assert dict(c["first_words"]) == {"yes": 1, "the": 1, "no.": 1}
