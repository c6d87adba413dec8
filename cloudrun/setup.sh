#!/usr/bin/env bash
# Sets up the Cloud Run path end to end: topics, dead-letter topic, service accounts with
# least-privilege roles, the GPU job, the dispatcher service, the trigger that feeds it and the
# Cloud Scheduler job that calls the dispatcher's sweep.
#
#   PROJECT_ID=my-project BUCKET_NAME=my-stems REGION=us-central1 cloudrun/setup.sh
#
# Variables:
#   PROJECT_ID     (required) the Google Cloud project
#   BUCKET_NAME    (required) bucket for stems and the dispatcher's dedupe markers
#   INPUT_BUCKET   bucket holding the originals (default: BUCKET_NAME)
#   REGION         a region with Cloud Run L4 GPUs for jobs (default: us-central1)
#   TRIGGER        push (default; Google's recommended path) or eventarc
#
# It expects the images REGION-docker.pkg.dev/PROJECT_ID/stem/stem-job:gpu and :cpu to be
# pushed already (docs/deployment.md, "Build and push the images"). Re-running it is safe: what
# exists is left alone, the job and the dispatcher are replaced with the YAML here.
#
# One consumer per topic: do not also run the GKE/KEDA deployment against the same stem-separate
# topic, or every track is separated twice.
set -euo pipefail

PROJECT_ID="${PROJECT_ID:?set PROJECT_ID}"
BUCKET_NAME="${BUCKET_NAME:?set BUCKET_NAME}"
INPUT_BUCKET="${INPUT_BUCKET:-$BUCKET_NAME}"
REGION="${REGION:-us-central1}"
TRIGGER="${TRIGGER:-push}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CLOUDSDK_CORE_PROJECT="$PROJECT_ID"     # every gcloud command below acts on it

PROJECT_NUMBER="$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')"
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
JOB_SA="stem-job@${PROJECT_ID}.iam.gserviceaccount.com"
DISPATCHER_SA="stem-dispatcher@${PROJECT_ID}.iam.gserviceaccount.com"
PUSH_SA="stem-push@${PROJECT_ID}.iam.gserviceaccount.com"

say() { printf '\n== %s\n' "$*"; }

# An IAM condition limiting a bucket role to objects under one prefix, and to listings of that
# prefix (a listing is checked against the bucket, so it needs the objectListPrefix attribute).
# It goes in a file because the expression holds commas, which --condition would split on.
prefix_condition() {   # prefix_condition PREFIX TITLE -> path of the condition file
  local file
  file="$(mktemp)"
  cat > "$file" <<EOF
{"title": "$2", "description": "objects under $1 in gs://${BUCKET_NAME}",
 "expression": "resource.name.startsWith(\"projects/_/buckets/${BUCKET_NAME}/objects/$1\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"$1\")"}
EOF
  echo "$file"
}

# -- APIs -------------------------------------------------------------------------------------
say "Enabling APIs"
gcloud services enable run.googleapis.com pubsub.googleapis.com storage.googleapis.com \
  artifactregistry.googleapis.com iam.googleapis.com cloudscheduler.googleapis.com
if [[ "$TRIGGER" == eventarc ]]; then
  gcloud services enable eventarc.googleapis.com
fi

# -- Topics -----------------------------------------------------------------------------------
say "Topics"
for topic in stem-separate stem-results stem-separate-dead-letter; do
  gcloud pubsub topics describe "$topic" >/dev/null 2>&1 || gcloud pubsub topics create "$topic"
done
# A topic keeps nothing without a subscription: this one holds dead letters for inspection
# and replay (31 days).
gcloud pubsub subscriptions describe stem-separate-dead-letter-hold >/dev/null 2>&1 ||
  gcloud pubsub subscriptions create stem-separate-dead-letter-hold \
    --topic=stem-separate-dead-letter --message-retention-duration=31d

# -- Bucket -----------------------------------------------------------------------------------
say "Bucket gs://$BUCKET_NAME"
if ! gcloud storage buckets describe "gs://$BUCKET_NAME" >/dev/null 2>&1; then
  # Uniform bucket-level access is what makes the prefix-scoped (conditional) roles below work.
  # The lifecycle rule deletes dispatcher markers after 8 days (Pub/Sub keeps messages 7).
  rules="$(mktemp)"
  printf '%s\n' '{"rule": [{"action": {"type": "Delete"},' \
    '"condition": {"age": 8, "matchesPrefix": ["dispatch/"]}}]}' > "$rules"
  gcloud storage buckets create "gs://$BUCKET_NAME" --location="$REGION" \
    --uniform-bucket-level-access --lifecycle-file="$rules"
else
  echo "exists: it needs uniform bucket-level access for the conditional roles below;"
  echo "add a lifecycle rule deleting dispatch/ objects older than 8 days (docs/deployment.md)"
fi

# -- Service accounts -------------------------------------------------------------------------
say "Service accounts"
create_sa() {
  gcloud iam service-accounts describe "$1@${PROJECT_ID}.iam.gserviceaccount.com" >/dev/null 2>&1 ||
    gcloud iam service-accounts create "$1" --display-name="$2"
}
create_sa stem-job "stem-job: separates tracks (Cloud Run job runtime)"
create_sa stem-dispatcher "stem-dispatcher: starts stem-job executions"
create_sa stem-push "stem-push: identity Pub/Sub or Eventarc uses to call the dispatcher"

# -- Roles: the job ---------------------------------------------------------------------------
say "Roles for $JOB_SA"
# Read the originals.
gcloud storage buckets add-iam-policy-binding "gs://$INPUT_BUCKET" \
  --member="serviceAccount:$JOB_SA" --role=roles/storage.objectViewer
# Write (and, on a retry, overwrite) stems and manifest.json, and check a finished set (get,
# list), under stems/ only.
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET_NAME" \
  --member="serviceAccount:$JOB_SA" --role=roles/storage.objectUser \
  --condition-from-file="$(prefix_condition stems/ stems-prefix-only)"
# Publish results.
gcloud pubsub topics add-iam-policy-binding stem-results \
  --member="serviceAccount:$JOB_SA" --role=roles/pubsub.publisher

# -- Roles: the dispatcher --------------------------------------------------------------------
say "Roles for $DISPATCHER_SA"
# Publish `failed` results for messages it refuses.
gcloud pubsub topics add-iam-policy-binding stem-results \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/pubsub.publisher
# Create, read, replace and delete its dedupe markers, under dispatch/ only.
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET_NAME" \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/storage.objectUser \
  --condition-from-file="$(prefix_condition dispatch/ dispatch-prefix-only)"

# -- The job ----------------------------------------------------------------------------------
say "Cloud Run job stem-job"
rendered="$(mktemp -d)"
# Whole words only (GNU sed's \b): CLOUD_RUN_REGION and GCP_PROJECT_ID are env names to keep.
for file in job.yaml dispatcher.yaml; do
  sed -e "s/\bPROJECT_ID\b/${PROJECT_ID}/g" -e "s/\bREGION\b/${REGION}/g" \
      -e "s/\bBUCKET_NAME\b/${BUCKET_NAME}/g" "$HERE/$file" > "$rendered/$file"
done
gcloud run jobs replace "$rendered/job.yaml" --region="$REGION"
# Run it with env overrides (JOB_MESSAGE) is all the dispatcher may do: not roles/run.developer,
# which could also change the job, but the executor-with-overrides role on this one job.
gcloud run jobs add-iam-policy-binding stem-job --region="$REGION" \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/run.jobsExecutorWithOverrides
# The sweep reads how each execution ended (executions and tasks of this job) ...
gcloud run jobs add-iam-policy-binding stem-job --region="$REGION" \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/run.viewer
# ... and whether the track's set is complete (manifest.json under stems/).
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET_NAME" \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/storage.objectViewer \
  --condition-from-file="$(prefix_condition stems/ stems-prefix-read)"
# ... made from the original as it is now (its generation, read from its metadata).
gcloud storage buckets add-iam-policy-binding "gs://$INPUT_BUCKET" \
  --member="serviceAccount:$DISPATCHER_SA" --role=roles/storage.objectViewer

# -- The dispatcher ---------------------------------------------------------------------------
say "Cloud Run service stem-dispatcher"
gcloud run services replace "$rendered/dispatcher.yaml" --region="$REGION"
URL="$(gcloud run services describe stem-dispatcher --region="$REGION" --format='value(status.url)')"
# Only the push identity may call it (no allUsers binding: the service stays private).
gcloud run services add-iam-policy-binding stem-dispatcher --region="$REGION" \
  --member="serviceAccount:$PUSH_SA" --role=roles/run.invoker
# Beside IAM, the dispatcher checks the push's OIDC token itself: Google's signature, this
# audience (the service URL, as the trigger below sends it) and the push identity.
gcloud run services update stem-dispatcher --region="$REGION" \
  --update-env-vars="PUSH_AUDIENCE=$URL,PUSH_SERVICE_ACCOUNT=$PUSH_SA"

# -- The trigger ------------------------------------------------------------------------------
# Pub/Sub's service agent mints the OIDC token for the push identity, and moves undeliverable
# messages to the dead-letter topic (publisher there, subscriber on the source subscription).
gcloud iam service-accounts add-iam-policy-binding "$PUSH_SA" \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
gcloud pubsub topics add-iam-policy-binding stem-separate-dead-letter \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher

# Retries: the dispatcher answers non-2xx only when a retry may help (Cloud Run API quota or
# outage, a duplicate delivery still in flight); back off 10 s .. 10 min, and after 5 deliveries
# park the message on the dead-letter topic. The ack deadline (60 s) covers the dispatcher's
# bounded Cloud Run API retries (DISPATCH_API_DEADLINE_S=30).
if [[ "$TRIGGER" == push ]]; then
  say "Push subscription stem-separate-dispatch -> $URL/pubsub"
  gcloud pubsub subscriptions describe stem-separate-dispatch >/dev/null 2>&1 ||
    gcloud pubsub subscriptions create stem-separate-dispatch --topic=stem-separate \
      --push-endpoint="$URL/pubsub" --push-auth-service-account="$PUSH_SA" \
      --push-auth-token-audience="$URL" --ack-deadline=60 \
      --dead-letter-topic=stem-separate-dead-letter --max-delivery-attempts=5 \
      --min-retry-delay=10s --max-retry-delay=600s
  SUBSCRIPTION=stem-separate-dispatch
else
  say "Eventarc trigger stem-separate-dispatch -> stem-dispatcher"
  gcloud eventarc triggers describe stem-separate-dispatch --location="$REGION" >/dev/null 2>&1 ||
    gcloud eventarc triggers create stem-separate-dispatch --location="$REGION" \
      --destination-run-service=stem-dispatcher --destination-run-region="$REGION" \
      --destination-run-path=/ \
      --event-filters="type=google.cloud.pubsub.topic.v1.messagePublished" \
      --transport-topic="projects/${PROJECT_ID}/topics/stem-separate" \
      --service-account="$PUSH_SA"
  # Eventarc creates the push subscription itself; give it the same dead-letter and retry
  # policy and ack deadline as the push path.
  SUBSCRIPTION="$(gcloud eventarc triggers describe stem-separate-dispatch --location="$REGION" \
    --format='value(transport.pubsub.subscription)')"
  gcloud pubsub subscriptions update "$SUBSCRIPTION" --ack-deadline=60 \
    --dead-letter-topic=stem-separate-dead-letter --max-delivery-attempts=5 \
    --min-retry-delay=10s --max-retry-delay=600s
fi
gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber

# -- The sweep --------------------------------------------------------------------------------
# A task SIGKILLed on its last attempt (out of memory, host loss) cannot publish its result.
# Every 5 minutes the dispatcher's POST /sweep publishes one for each execution that ended
# without one (docs/deployment.md, "Every message ends with one result"). The push identity
# already may invoke the dispatcher; Cloud Scheduler mints its OIDC token.
say "Cloud Scheduler job stem-dispatch-sweep -> $URL/sweep"
gcloud scheduler jobs describe stem-dispatch-sweep --location="$REGION" >/dev/null 2>&1 ||
  gcloud scheduler jobs create http stem-dispatch-sweep --location="$REGION" \
    --schedule="*/5 * * * *" --uri="$URL/sweep" --http-method=POST \
    --oidc-service-account-email="$PUSH_SA" --oidc-token-audience="$URL" \
    --attempt-deadline=50s    # the dispatcher's request timeout (dispatcher.yaml)

say "Done"
echo "Publish a stem-separate message to try it:"
echo "  gcloud pubsub topics publish stem-separate --message='{\"releaseId\":\"rel_1\",\"trackId\":\"trk_1\",\"originalStemUri\":\"gs://${INPUT_BUCKET}/originals/song.mp3\",\"mimeType\":\"audio/mpeg\"}'"
echo "and watch: gcloud run jobs executions list --job=stem-job --region=$REGION"
