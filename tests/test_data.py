import pytest

from ftl.data import Fields, load_examples
from ftl.errors import DataError
from conftest import write_jsonl


def test_qa_rows_become_conversations(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"Question": "Q1?", "Answer": "A1."}, "", {"Question": "Q2?", "Answer": "A2."}])
    examples = load_examples(path, system_prompt="Be brief.")
    assert [e.line for e in examples] == [1, 3]
    assert examples[0].messages == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]


def test_field_mapping_and_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Hi?", "completion": "Hello."},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    examples = load_examples(path, Fields(question="prompt", answer="completion"))
    assert examples[0].messages[-1]["content"] == "Hello."
    assert examples[1].messages[-1] == {"role": "assistant", "content": "y"}


def test_malformed_line_names_file_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"Question": "a", "Answer": "b"}, '{"Question": "broken'])
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert f"{path}:2" in message and "malformed JSON" in message and "one complete JSON object" in message


def test_missing_field_says_which_and_how_to_map(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"Question": "a", "Answer": "b"}, {"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert f"{path}:2" in str(info.value) and "'Question'" in str(info.value)
    assert "--question-field" in str(info.value) and "answer, question" in str(info.value)


def test_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty"):
        load_examples(path)


def test_messages_must_end_with_assistant(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="assistant"):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")
