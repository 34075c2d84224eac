import torch

from minildm import thread_share


def test_follow_takes_the_written_count_and_ignores_what_it_cannot_read(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    share = tmp_path / "job.threads"
    monkeypatch.setattr(thread_share, "_last_seen", None)
    try:
        thread_share.follow()  # no $MINILDM_THREAD_SHARE: outside the course nothing changes
        assert torch.get_num_threads() == before

        monkeypatch.setenv(thread_share.ENV, str(share))
        thread_share.follow()  # not written yet
        assert torch.get_num_threads() == before

        thread_share.write(share, 1)
        thread_share.follow()
        assert torch.get_num_threads() == 1
        thread_share.write(share, 3)
        thread_share.follow()
        assert torch.get_num_threads() == 3, "a new count is taken at the next call"

        share.write_text("half\n")
        thread_share.follow()
        assert torch.get_num_threads() == 3, "unreadable contents keep the current count"
        assert not share.with_suffix(".tmp").exists(), "write() replaces the file whole"
    finally:
        torch.set_num_threads(before)
