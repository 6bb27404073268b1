"""neoj.huge_pages: large CPU weights move into one huge-page region, values and sharing intact."""

import sys
import weakref

import pytest
import torch
from torch import nn

import neoj
from neoj import huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")

BIG = huge_pages.MIN_BYTES // 4  # fp32 elements of the smallest tensor that moves


def advised_for_huge_pages(t: torch.Tensor) -> bool:
    """True when the mapping holding t's first byte has the kernel's "hg" flag (madvise MADV_HUGEPAGE)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                low, high = (int(a, 16) for a in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


class Shared(nn.Module):
    """Two linears sharing one weight, a buffer held by two modules, a small tensor, a view and an int8 table."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(BIG // 256, 256, bias=False)
        self.b = nn.Linear(BIG // 256, 256, bias=False)
        self.b.weight = self.a.weight
        self.c = nn.Linear(BIG // 128, 128)  # another big one, with a small bias
        table = torch.randn(BIG)
        self.a.register_buffer("table", table)
        self.c.register_buffer("table", table)
        self.c.register_buffer("codes", torch.randint(-127, 128, (BIG * 4,), dtype=torch.int8))  # integers: stay
        whole = torch.randn(BIG * 2)
        self.register_buffer("part", whole[:BIG])  # part of a larger storage: stays


@pytest.fixture
def thp_madvise(tmp_path, monkeypatch):
    """A THP setting of "madvise" (the usual distribution default), whatever this machine's is."""
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    monkeypatch.delenv("NEOJ_HUGE_PAGES", raising=False)
    return setting


def test_large_tensors_move_into_one_advised_region_with_their_values(thp_madvise):
    torch.manual_seed(0)
    m = Shared()
    before = {name: t.clone() for name, t in m.state_dict().items()}
    small_ptr, part_ptr, codes_ptr = m.c.bias.data_ptr(), m.part.data_ptr(), m.c.codes.data_ptr()
    weight = m.a.weight
    moved = huge_pages.move_to_huge_pages(m)
    assert moved == 3 * BIG * 4  # the shared weight once, the shared table once, c's weight
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert m.a.weight is weight and m.b.weight is weight and weight.requires_grad  # still one Parameter
    assert m.a.table.data_ptr() == m.c.table.data_ptr()  # the shared buffer is still one tensor
    assert m.c.bias.data_ptr() == small_ptr and m.part.data_ptr() == part_ptr  # small, and a view: untouched
    assert m.c.codes.data_ptr() == codes_ptr
    for t in (m.a.weight, m.c.weight, m.a.table):
        assert advised_for_huge_pages(t)
    # One region, in model order: a's weight, the table (first held by a), c's weight.
    assert m.a.table.data_ptr() == m.a.weight.data_ptr() + m.a.weight.nbytes
    assert m.c.weight.data_ptr() == m.a.table.data_ptr() + m.a.table.nbytes


def test_each_old_tensor_is_freed_before_the_next_one_is_copied(thp_madvise, monkeypatch):
    m = nn.Module()
    for i in range(3):
        m.register_buffer(f"b{i}", torch.randn(BIG))
    old = [weakref.ref(getattr(m, f"b{i}")) for i in range(3)]
    alive_at_each_copy = []
    make = torch.frombuffer

    def spy(*args, **kwargs):
        if kwargs.get("count", 0) > 1:  # a tensor's new home (not the region's address probe)
            alive_at_each_copy.append([ref() is not None for ref in old])
        return make(*args, **kwargs)

    monkeypatch.setattr(torch, "frombuffer", spy)
    huge_pages.move_to_huge_pages(m)
    # Memory grows by one tensor at a time, never by the model.
    assert alive_at_each_copy == [[True, True, True], [False, True, True], [False, False, True]]
    assert all(ref() is None for ref in old)


def regions_made(monkeypatch) -> list:
    """Records a weak reference to each huge-page region move_to_huge_pages makes from now on."""
    made, make = [], huge_pages.huge_page_region

    def spy(nbytes):
        region, start = make(nbytes)
        made.append(weakref.ref(region))
        return region, start

    monkeypatch.setattr(huge_pages, "huge_page_region", spy)
    return made


def test_the_region_is_unmapped_with_the_last_tensor_in_it(thp_madvise, monkeypatch):
    made = regions_made(monkeypatch)
    m = nn.Linear(BIG // 64, 64)
    huge_pages.move_to_huge_pages(m)
    weight = m.weight.detach()  # a view that outlives the module's own tensor
    m.double()  # every parameter replaced by a new tensor
    assert len(made) == 1 and made[0]() is not None  # the view keeps the mapping
    del weight
    assert made[0]() is None  # the mmap object is gone, and with it the mapping


def test_moved_weights_train_and_compute_as_before(thp_madvise):
    torch.manual_seed(0)
    m = nn.Linear(BIG // 64, 64)
    x = torch.randn(3, BIG // 64)
    expected = m(x)
    huge_pages.move_to_huge_pages(m)
    assert torch.equal(m(x), expected)
    m(x).sum().backward()  # gradients land on the moved parameter
    assert m.weight.grad is not None and m.weight.grad.shape == m.weight.shape


def test_nothing_moves_where_thp_is_never_or_turned_off(thp_madvise, monkeypatch):
    m = nn.Linear(BIG // 64, 64)
    ptr = m.weight.data_ptr()
    thp_madvise.write_text("always madvise [never]\n")
    assert huge_pages.move_to_huge_pages(m) == 0
    thp_madvise.write_text("always [madvise] never\n")
    monkeypatch.setenv("NEOJ_HUGE_PAGES", "0")
    assert huge_pages.move_to_huge_pages(m) == 0
    assert m.weight.data_ptr() == ptr


def test_a_missing_thp_setting_means_no_huge_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "absent")
    monkeypatch.delenv("NEOJ_HUGE_PAGES", raising=False)
    assert not huge_pages.available()


def test_a_model_nothing_large_in_is_left_alone(thp_madvise):
    m = nn.Linear(16, 16)
    ptr = m.weight.data_ptr()
    assert huge_pages.move_to_huge_pages(m) == 0
    assert m.weight.data_ptr() == ptr


def test_load_puts_the_large_weights_in_huge_pages_and_generates_the_same(thp_madvise, monkeypatch):
    lm = neoj.load(device="cpu")  # the built-in model: its embedding (tied to the head) is over 2 MB
    assert advised_for_huge_pages(lm.model.wte.weight)
    assert lm.model.lm_head.weight is lm.model.wte.weight
    monkeypatch.setenv("NEOJ_HUGE_PAGES", "0")
    made = regions_made(monkeypatch)
    plain = neoj.load(device="cpu")
    assert made == []
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model.logits(lm.model(ids)), plain.model.logits(plain.model(ids)))
