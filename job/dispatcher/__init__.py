"""The Cloud Run dispatcher: one stem-separate Pub/Sub message in, one Cloud Run job execution out.

A Cloud Run job cannot subscribe to Pub/Sub, so this small HTTP service receives each message
(a direct Pub/Sub push, Google's recommended path, or an Eventarc CloudEvent), validates it,
and starts the job with the message in its JOB_MESSAGE env override. One module per step:

  envelope     the request -> an Envelope (message bytes, messageId)
  service      the decisions and the status each answer gets
  dedupe       one execution per messageId (GCS markers with generation preconditions)
  executions   run_job with the env override, bounded retries
  sweep        a result for every execution that ended without one (POST /sweep)
  settings     DISPATCH_* and the shared variables, parsed by job.config
  app          HTTP routes and `serve`, which `stem-job dispatch` calls
"""

from job.dispatcher.app import create_app, serve
from job.dispatcher.settings import DispatcherSettings, load_dispatcher_settings

__all__ = ["DispatcherSettings", "create_app", "load_dispatcher_settings", "serve"]
