import pytest

from sapo.data import load_rows, prepare_prompts, prompts_for_step
from sapo.errors import ConfigError
from sapo.model.tiny import char_tokenizer


def test_each_epoch_visits_every_row_once_and_steps_are_reproducible():
    indices = [i for step in range(5) for i in prompts_for_step(step, 4, 10, seed=1)]
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a fresh shuffle each epoch
    assert prompts_for_step(3, 4, 10, seed=1) == indices[12:16]
    assert prompts_for_step(0, 4, 10, seed=2) != prompts_for_step(0, 4, 10, seed=1)


def test_overlong_prompts_are_named_or_filtered():
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (3, 12, 5, 20)]
    with pytest.raises(ConfigError, match=r"2 of 4 prompts in data are longer than max_prompt_length=10 tokens: "
                                          r"row 1 \(12 tokens\), row 3 \(20 tokens\)"):
        prepare_prompts(rows, char_tokenizer(), max_prompt_length=10, filter_overlong=False, name="data")
    kept = prepare_prompts(rows, char_tokenizer(), max_prompt_length=10, filter_overlong=True, name="data")
    assert [len(r["prompt"]) for r in kept.rows] == [3, 5]


def test_missing_prompt_column_and_mixed_formats():
    with pytest.raises(ConfigError, match=r"no 'prompt' column \(columns: \['answer', 'question'\]\)"):
        prepare_prompts([{"question": "q", "answer": "a"}], char_tokenizer(), max_prompt_length=9,
                        filter_overlong=False)
    mixed = [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "plain"}]
    with pytest.raises(ConfigError, match=r"row 1: 'prompt' must be a string in every row, or a list"):
        prepare_prompts(mixed, char_tokenizer(), max_prompt_length=99, filter_overlong=False)
    for empty in ("", []):
        with pytest.raises(ConfigError, match=r"row 1: the prompt is empty"):
            prepare_prompts([{"prompt": "ok" if empty == "" else [{"role": "user", "content": "hi"}]},
                             {"prompt": empty}], char_tokenizer(), max_prompt_length=99, filter_overlong=False)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset file '.*missing.jsonl' does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match=r"dataset='no_such_task' is neither a .jsonl/.json/.parquet file nor"):
        load_rows("no_such_task")
    with pytest.raises(ConfigError, match=r"^eval_dataset='no_such_task' is neither"):  # the field that holds it
        load_rows("no_such_task", split="test", field="eval_dataset")
    with pytest.raises(ConfigError, match=r"^eval_dataset file '.*missing.jsonl' does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"), split="test", field="eval_dataset")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"dataset file '.*empty.jsonl' is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_parquet_and_json(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text('[{"prompt": "b", "answer": "2"}]')
    assert load_rows(str(tmp_path / "d.parquet")) == [{"prompt": "a", "answer": "1"}]
    assert load_rows(str(tmp_path / "d.json")) == [{"prompt": "b", "answer": "2"}]


@pytest.mark.parametrize("name,content", [("blank.jsonl", "\n \n\n"), ("list.json", "[]"), ("object.json", "{ }")])
def test_a_file_of_zero_rows_says_so(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=rf"^dataset file '.*{name}' has no rows \(it parses to zero records\)"):
        load_rows(str(tmp_path / name))


def test_a_parquet_file_of_zero_rows_says_so(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(ConfigError, match="eval_dataset file .* has no rows"):
        load_rows(str(tmp_path / "empty.parquet"), field="eval_dataset")


@pytest.mark.parametrize("task,options,message", [
    ("arithmetic", {"digits": 1000000},
     r"^arithmetic: task_kwargs.digits must be an integer from 1 to 40, got 1000000"),
    ("arithmetic", {"digits": "3"}, r"task_kwargs.digits must be an integer from 1 to 40, got '3'"),
    ("arithmetic", {"operands": True}, r"task_kwargs.operands must be an integer from 2 to 50, got True"),
    ("arithmetic", {"ops": 3}, r"task_kwargs.ops must be made of '\+' and '-'"),
    ("arithmetic", {"test_size": 0}, r"task_kwargs.test_size must be an integer from 1 to 1000000"),
    ("countdown", {"max_number": 10**6}, r"^countdown: task_kwargs.max_number must be an integer from 1 to 100"),
    ("countdown", {"numbers": 3}, r"^task_kwargs: task 'countdown' has no option 'numbers' \(options: seed, operands"),
])
def test_task_options_out_of_range_get_the_tasks_own_message(task, options, message):
    with pytest.raises(ConfigError, match=message):
        load_rows(task, task_kwargs=options)


def test_a_registered_task_takes_the_options_its_loader_declares():
    from sapo.tasks import TASKS, Task, register_task

    def plain(split, seed=0, size=3):
        return [{"prompt": f"{split}-{seed}-{i}"} for i in range(size)]

    def anything(split, **options):
        return [{"prompt": f"{k}={v}"} for k, v in options.items()]

    try:
        register_task(Task("plain_task", plain))
        register_task(Task("open_task", anything))
        assert len(load_rows("plain_task", task_kwargs={"size": 2, "seed": 1})) == 2
        assert load_rows("open_task", task_kwargs={"whatever": 1}) == [{"prompt": "whatever=1"}]
        with pytest.raises(ConfigError, match=r"task 'plain_task' has no option 'sizes' \(options: seed, size"):
            load_rows("plain_task", task_kwargs={"sizes": 2})
    finally:
        TASKS._entries.pop("plain_task", None)
        TASKS._entries.pop("open_task", None)


def test_a_test_split_that_holds_every_problem_leaves_no_silent_empty_train_split():
    with pytest.raises(ConfigError, match=r"only 0 problems are left for train once the 100 test problems are set "
                                          r"aside at this difficulty; lower test_size"):
        load_rows("arithmetic", task_kwargs={"digits": 1, "test_size": 100})
