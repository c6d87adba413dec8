#!/usr/bin/env bash
# One-off, for issue 32 ("units named for what they are"): the renames inside files that other
# branches were changing at the time. Run once from a clean tree after those branches are
# merged, check, commit, then delete this script. Each change must find what it replaces, or
# the script says which one it could not find and exits 1 (a docstring that was already
# changed is only reported: compare it with the notes by hand).
#
#   Pulled (job/drain.py)                    -> Delivery
#   Pushed (job/dispatcher/envelope.py)      -> Envelope
#   Finishing (job/pipeline.py)              -> PendingResult; .step() -> .run(), .rest -> .next_step
#   manifest.build/matches(..., settings)    -> manifest.Recipe.of(settings): what the set is made with
#   open_encoders(..., s, ...) in pipeline   -> open_encoders(..., Encoding.of(s), ...)
#   messages.outputs_of(request, settings)   -> outputs_of(request, settings.outputs)
#   the class docstrings that apologised for their length (pubsub, dispatcher, storage, drain)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

missed=0
PY_DIRS=(job tests hack)
MD_FILES=(README.md docs)

# change FILE WHAT PERL: apply PERL (a substitution over the whole file) or say it found nothing
change() {
  local file=$1 what=$2 expr=$3 before
  before=$(sha1sum <"$file")
  perl -0777 -pi -e "$expr" "$file"
  if [[ $(sha1sum <"$file") == "$before" ]]; then
    echo "NOT FOUND: $what in $file" >&2
    missed=1
  fi
}

# rename OLD NEW: the whole word in every Python file, and `OLD` in backticks in the docs
rename() {
  local old=$1 new=$2 files
  files=$(grep -rlw --include='*.py' -e "$old" "${PY_DIRS[@]}" || true)
  if [[ -z $files ]]; then
    echo "NOT FOUND: $old anywhere in ${PY_DIRS[*]}" >&2
    missed=1
    return
  fi
  # shellcheck disable=SC2086  # one path per word
  perl -pi -e "s/\\b\\Q$old\\E\\b/$new/g" $files
  { grep -rl --include='*.md' -e "\`$old\`" "${MD_FILES[@]}" || true; } \
    | xargs -r perl -pi -e "s/\`\\Q$old\\E\`/\`$new\`/g"
  echo "renamed $old -> $new in: $(echo $files)"
}

# -- type names -------------------------------------------------------------------------------
change job/dispatcher/__init__.py "'a Pushed'" 's/\ba Pushed\b/an Envelope/g'
rename Pulled Delivery
rename Pushed Envelope
rename Finishing PendingResult
change job/pipeline.py "the local 'finishing'" 's/\bfinishing\b/pending/g'
change job/pipeline.py "PendingResult.step" 's/\bdef step\(self, work\)/def run(self, work)/; s/\.step\(/.run(/g'
change job/pipeline.py "PendingResult.rest" 's/\.rest\b/.next_step/g'

# -- leaves take what they use ----------------------------------------------------------------
# manifest.Recipe: the settings a set is made with, under the settings' own names (as
# job.audio.encode.Encoding for the encoders), so build, matches and entry take it instead of
# the whole Settings.
change job/manifest.py "settings (as a parameter)" 's/\bsettings(?=[.,)]|[ \t]*$)/recipe/mg'
change job/manifest.py "import datetime" 's/^import datetime\n/import dataclasses\nimport datetime\n/m'
change job/manifest.py "def bitrate" 's/^def bitrate\(recipe\)/\@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a set is made with, as its manifest records it: settings MODEL_NAME, OUTPUT_FORMAT,
    MP3_BITRATE, MP3_QUALITY, SHIFTS and SILENT_BELOW_LU (README), under the settings\x27 own names."""

    model_name: str
    output_format: str
    mp3_bitrate: int
    mp3_quality: int
    shifts: int
    silent_below_lu: float

    \@classmethod
    def of(cls, settings) -> Recipe:
        return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)})


def bitrate(recipe)/m'
change job/pipeline.py "manifest.matches(..., s, ...)" \
  's/(manifest\.matches\(\s*found,\s*fetched\.original\.identity,\s*)s,/$1manifest.Recipe.of(s),/'
change job/pipeline.py "manifest.build(request, s, ...)" \
  's/(manifest\.build\(\s*request,\s*)s,/$1manifest.Recipe.of(s),/'
change job/intake.py "manifest.matches(..., self.settings, ...)" \
  's/(manifest\.matches\(\s*found,\s*original\.identity,\s*)self\.settings,/$1manifest.Recipe.of(self.settings),/'
# messages.outputs_of: the request's own list, else the OUTPUTS setting it is given
change job/messages.py "outputs_of(request, settings)" \
  's/^def outputs_of\(request: JobRequest, settings\) -> tuple:/def outputs_of(request: JobRequest, default: tuple) -> tuple:/m; s/return request\.outputs or settings\.outputs\b/return request.outputs or default/; s/its own list, else the OUTPUTS setting \(empty: every\s+source of the model; job\/outputs\.py resolves the names once the model is known\)\."""/its own list, else `default` (the OUTPUTS setting;\n    empty: every source of the model; job\/outputs.py resolves the names once the model is\n    known)."""/'
change job/intake.py "outputs_of(request, self.settings)" \
  's/\boutputs_of\(request, self\.settings\)/outputs_of(request, self.settings.outputs)/'
change job/pipeline.py "messages.outputs_of(request, s)" \
  's/\bmessages\.outputs_of\(request, s\)/messages.outputs_of(request, s.outputs)/'
change job/pipeline.py "open_encoders(..., s, ...)" \
  's/(open_encoders\([^()]*?,[^()]*?,\s*)s\b/$1Encoding.of(s)/'
change job/pipeline.py "the import of open_encoders" \
  's/^(from job\.audio\.encode import )(?!.*\bEncoding\b)/$1Encoding, /m'

# -- class docstrings that say what the class is for (/work/notes/i32code-docstrings.md) ----------
# docstring FILE CLASS PHRASE NEW: replace CLASS's docstring while it still holds PHRASE
docstring() {
  local file=$1 class=$2 phrase=$3 new=$4 before
  before=$(sha1sum <"$file")
  CLASS=$class PHRASE=$phrase NEW=$new perl -0777 -pi -e '
    s/(^class \Q$ENV{CLASS}\E\b[^\n]*:\n    """)((?:(?!""").)*?\Q$ENV{PHRASE}\E(?:(?!""").)*?)"""/$1$ENV{NEW}"""/ms
  ' "$file"
  if [[ $(sha1sum <"$file") == "$before" ]]; then
    echo "docstring of $class in $file not replaced (changed already?): see the notes" >&2
  fi
}
docstring job/pubsub.py LeaseKeeper "One class because" \
'Holds pulled messages and extends their ack deadline every `deadline_s / 3` seconds until
    each is acked or nacked. Use as a context manager: leaving it nacks whatever is still held,
    so an unfinished message goes straight back to the queue.'
docstring job/dispatcher/service.py Dispatcher "its own short method" \
'What the dispatcher decides for one push: validate, dedupe, start the job, report bad
    input, and the status each answer gets. Clients may be injected (tests); otherwise they are
    made on first use, so the service starts and answers /health without credentials.'
docstring job/dispatcher/sweep.py Sweeper "Short methods" \
'One sweep over the markers of `dispatcher` (a service.Dispatcher): per marker, the
    execution'"'"'s state, then the result it still owes; `sweep()` returns how many markers were
    open, still running, already reported, published for, or failed to sweep.'
docstring job/storage/commit.py GcsCommit "One class because" \
'One writer'"'"'s claim on a track, its fenced uploads, and its manifest (a context manager:
    entering claims). Every write after the claim is conditioned on a generation read while the
    claim stood, so a writer that has lost the track cannot overwrite the one that holds it.'
docstring job/storage/gcs.py GcsStorage "One class for" \
'Originals from allowed buckets; stems and manifests in `bucket`: the Storage protocol
    and the object primitives GcsCommit fences (upload, generation, manifest put), over one
    client, bucket and retry budget (`_call`).'
docstring job/storage/local.py LocalStorage "each short" \
'Originals from local paths; stems under OUTPUT_DIR/RELEASE/TRACK/: the Storage protocol
    on a filesystem, every name checked before it becomes a path (IDs, INPUT_DIR).'
docstring job/drain.py Drainer "Longer than a unit" \
'One drain process: its clients, its model cache and the track finishing in the
    background while the next separates, the state every step of a batch shares (pull, fetch
    ahead, handle, finish, conclude).'

# -- imports sorted, code formatted -------------------------------------------------------------
ruff=.venv/bin/ruff
[[ -x $ruff ]] || ruff=ruff
"$ruff" check --select I --fix --quiet job tests hack
"$ruff" format --quiet job tests hack

if ((missed)); then
  echo "some changes found nothing to change (above): apply those by hand" >&2
  exit 1
fi
echo "done: run ruff check, lint-imports, tests/test_structure.py and the tests of what changed"
