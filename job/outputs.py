"""Output names: what a job can write, given the sources of the model that separates.

- a source of the model, by its name (`vocals`, `drums`, ...: whatever the model separates);
- `instrumental`: every source but `vocals` (as before any model could be chosen);
- `no_SOURCE`: every source but one (`no_drums`), so `no_vocals` is the instrumental;
- `A+B[+C...]`: the sum of those sources (`drums+bass`);
- `ni_stems`: one NI Stems file for DJ software (job/audio/nistems.py), the mix and four stems.

A mix is the float sum of the engine's stems before any limiting, added in the model's source
order, so two names for the same sources (`instrumental`, `no_vocals`) are the same samples.

Names are checked twice: their form as soon as a message, setting or query names them (a typo
is refused before anything is downloaded), and against the model's sources once the model is
known. A model's source names become output names, object names and URLs, so they must have
the form of a name here; a model whose sources do not is a configuration error.
"""

import re

from job.errors import JobError

INSTRUMENTAL = "instrumental"
NI_STEMS = "ni_stems"
WITHOUT = "no_"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # one source's name
MAX_OUTPUTS = 32  # one encoder thread each: a request cannot ask for an unbounded number
MAX_NAME = 128  # a sum's whole name, as long as an ID
# The four stems of an NI Stems file, in the order its format fixes. Each slot holds the model's
# source of that name; `other` also takes every source no slot names (guitar, piano, ...); a slot
# whose source the model lacks is silent.
NI_SLOTS = ("drums", "bass", "other", "vocals")
HOW = "a source of the model, instrumental, no_SOURCE, SOURCE+SOURCE or ni_stems"


def check_names(value, what: str = "outputs") -> tuple:
    """A list of output names (a message's field, a setting, a query) to a tuple of distinct
    names, lowercased, in the order given; JobError `invalid_outputs` naming what is wrong.
    Only the form is checked here: whether a source exists depends on the model."""
    if not isinstance(value, (list, tuple)) or not value:
        raise JobError("invalid_outputs", f"{what} must be a non-empty list of output names")
    names = []
    for item in value:
        if not isinstance(item, str):
            raise JobError(
                "invalid_outputs",
                f"{what} holds {type(item).__name__} {item!r:.40}: use output names ({HOW})",
            )
        name = item.strip().lower()
        parts = name.split("+")
        if len(name) > MAX_NAME or not all(NAME.match(part) for part in parts):
            raise JobError(
                "invalid_outputs",
                f"{what} names {item[:40]!r}, which is not an output name: use {HOW} "
                "(letters, digits, _ and -)",
            )
        if name not in names:
            names.append(name)
    if len(names) > MAX_OUTPUTS:
        raise JobError(
            "invalid_outputs", f"{what} names {len(names)} outputs, more than {MAX_OUTPUTS}"
        )
    return tuple(names)


def check_sources(sources) -> None:
    """Whether a model's source names can be output names; ValueError saying which cannot."""
    for source in sources:
        if not isinstance(source, str) or not NAME.match(source):
            raise ValueError(
                f"its source {source!r} is not a usable output name (lowercase letters, "
                "digits, _ and -, up to 64)"
            )
        if source.startswith(WITHOUT) or source == NI_STEMS:
            raise ValueError(f"its source {source!r} would be read as a mix ({WITHOUT}SOURCE)")
    if len(set(sources)) != len(sources):
        raise ValueError(f"its sources repeat a name ({', '.join(sources)})")


def parts(name: str, sources) -> tuple:
    """The indices (in `sources`) of the sources that `name` sums; JobError `invalid_outputs`
    when the model has no such output."""
    sources = list(sources)
    if name in sources:
        return (sources.index(name),)

    def fail(why: str):
        raise JobError(
            "invalid_outputs",
            f"output {name!r} {why}: this model separates {', '.join(sources)}; use {HOW}",
        )

    if name == INSTRUMENTAL:
        if "vocals" not in sources or len(sources) < 2:
            fail("needs a vocals source and another one")
        name = WITHOUT + "vocals"
    if name.startswith(WITHOUT):
        left = name[len(WITHOUT) :]
        if left not in sources or len(sources) < 2:
            fail(f"leaves out {left!r}, which the model does not separate")
        return tuple(i for i, source in enumerate(sources) if source != left)
    summed = name.split("+")
    if len(summed) < 2:
        fail("is not a source of this model")
    missing = [part for part in summed if part not in sources]
    if missing:
        fail(f"sums {', '.join(map(repr, missing))}, which the model does not separate")
    if len(set(summed)) != len(summed):
        fail("names a source twice")
    return tuple(sorted(sources.index(part) for part in summed))


def plan(names, sources) -> tuple:
    """The outputs to write, in one canonical order (the skip check compares lists): the
    sources in the model's order, `instrumental`, the `no_` mixes, the sums as asked, then
    `ni_stems`. Empty `names` means every source. JobError `invalid_outputs` for a name the
    model cannot make."""
    if not names:
        return tuple(sources)
    for name in names:
        if name != NI_STEMS:
            parts(name, sources)

    def rank(name):
        if name in sources:
            return (0, list(sources).index(name))
        if name == INSTRUMENTAL:
            return (1, 0)
        if name.startswith(WITHOUT):
            return (2, list(sources).index(name[len(WITHOUT) :]))
        return (3, 0) if name != NI_STEMS else (4, 0)

    return tuple(sorted(names, key=rank))


def ni_slots(sources) -> tuple:
    """For each of NI_SLOTS, the indices of the sources it sums (empty: a silent stem)."""
    named = [slot for slot in NI_SLOTS if slot != "other"]
    return tuple(
        tuple(
            i
            for i, source in enumerate(sources)
            if source == slot or (slot == "other" and source not in named)
        )
        for slot in NI_SLOTS
    )
