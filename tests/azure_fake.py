"""Offline fake of the Azure ML ARM/MFE + blob endpoints, for driving the real azure-ai-ml SDK.

Nothing here mocks the SDK: azure-ai-ml's own code runs all the way to HTTP, and this server on
127.0.0.1 answers as the workspace's REST API and blob storage would (enough of them for ftl's
calls). Requests reach it through azure-core's transport (``MLClient(..., transport=...)``) and,
for the blob clients the SDK builds itself, a class-wide patch of ``RequestsTransport.send``.

Usage:
    fake = FakeAzureML(); fake.start()
    ml = make_ml_client(fake)          # MLClient whose every azure-core request goes to the fake
    ...
    fake.log  -> list of (method, orig_host, path_with_query)
"""
import json
import re
import threading
import time
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit, urlunsplit

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport

SUB = "00000000-0000-0000-0000-000000000000"
RG = "rg"
WS = "ws"
ACCOUNT = "fakestorage"
CONTAINER = "azureml-blobstore-0000"
WS_PREFIX = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"


class FakeCredential:
    """TokenCredential that never touches the network."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("fake-token", int(time.time()) + 3600)

    # azure-core >= 1.31 prefers get_token_info when present; optional
    def close(self):
        pass


def _redirect(request, port, send):
    """Send `request` to the fake, but restore request.url afterwards: RetryPolicy re-sends the *same*
    request object, and BearerTokenCredentialPolicy refuses non-https URLs on the retry otherwise."""
    orig_url = request.url
    u = urlsplit(orig_url)
    if u.netloc == f"127.0.0.1:{port}":
        return send(request)
    request.headers["X-Orig-Host"] = u.netloc
    request.url = urlunsplit(("http", f"127.0.0.1:{port}", u.path, u.query, ""))
    try:
        return send(request)
    finally:
        request.url = orig_url


class LocalTransport(RequestsTransport):
    """Pass as MLClient(..., transport=LocalTransport(port)). Reaches every ARM/MFE/dataplane client the SDK
    builds, but NOT the azure-storage-blob clients used for uploads (see patch_all_azure_transports)."""

    def __init__(self, port, **kw):
        super().__init__(**kw)
        self.port = port

    def send(self, request, **kwargs):
        return _redirect(request, self.port, lambda r: super(LocalTransport, self).send(r, **kwargs))


def patch_all_azure_transports(port):
    """Blob clients built inside the SDK (BlobServiceClient/ContainerClient) do not receive MLClient's
    transport= kwarg, so patch RequestsTransport.send class-wide. Returns an undo function."""
    orig = RequestsTransport.send

    def send(self, request, **kwargs):
        if isinstance(self, LocalTransport):
            return orig(self, request, **kwargs)
        return _redirect(request, port, lambda r: orig(self, r, **kwargs))

    RequestsTransport.send = send
    return lambda: setattr(RequestsTransport, "send", orig)


def arm_error(code, message, status):
    return status, {"error": {"code": code, "message": message}}


class FakeAzureML:
    def __init__(self, job_status_sequence=("Queued", "Running", "Completed"), code_exists=False):
        self.log = []
        self.bodies = []
        self.auth = []  # Authorization header per request (ARM: 'Bearer fake-token'; blob: None, SAS in query)
        self.jobs = {}
        self.assets = {}  # path -> json
        self.blobs = {}
        self.blob_meta = {}
        self.job_status_sequence = list(job_status_sequence)
        self.code_exists = code_exists
        # list of dicts: {"method": "PUT", "path_re": r"/jobs/", "status": 503, "body": {...}, "headers": {...}}
        self.fail_plan = []
        self.computes = {"gpu-cluster": "STANDARD_NC24ADS_A100_V4", "cpu-cluster": "STANDARD_DS3_V2"}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ server plumbing
    def start(self):
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                host = self.headers.get("X-Orig-Host", "")
                with fake.lock:
                    fake.log.append((self.command, host, self.path))
                    fake.bodies.append(raw)
                    fake.auth.append(self.headers.get("Authorization"))
                    status, body, headers = fake.route(self.command, host, self.path, raw, self.headers)
                if isinstance(body, (dict, list)):
                    data = json.dumps(body).encode()
                    headers.setdefault("Content-Type", "application/json")
                elif isinstance(body, str):
                    data = body.encode()
                else:
                    data = body or b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(data)))
                self.send_header("x-ms-request-id", str(uuid.uuid4()))
                self.send_header("Date", formatdate(usegmt=True))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.port

    def stop(self):
        self.server.shutdown()

    # ------------------------------------------------------------------ routing
    def route(self, method, host, full_path, raw, headers):
        u = urlsplit(full_path)
        path, q = u.path, parse_qs(u.query)
        for i, f in enumerate(self.fail_plan):
            if f.get("method", method) == method and re.search(f["path_re"], path):
                self.fail_plan.pop(i)
                if f.get("after"):  # the service does the work, and its answer is lost on the way back
                    self.route(method, host, full_path, raw, headers)
                return f["status"], f.get("body", {}), dict(f.get("headers", {}))
        if ".blob." in host or path.startswith("/blob/"):
            return self.blob(method, path, q, raw, headers)
        body = json.loads(raw) if raw and raw[:1] in (b"{", b"[") else None
        if path == "/discovery":  # workspace discoveryUrl -> regional dataplane base urls (used by jobs.stream/download)
            api = "https://eastus.api.azureml.ms"
            return 200, {k: api for k in ("api", "catalog", "experimentation", "history", "hyperdrive", "labeling",
                                          "modelmanagement", "pipelines")} | {"studio": "https://ml.azure.com"}, {}
        if path.startswith("/history/v1.0" + WS_PREFIX) and method == "GET":
            m = re.search(r"/runs/([^/]+)(/details)?$", path)
            if m and m.group(1) in self.jobs:
                j = self.jobs[m.group(1)]
                seq = self.job_status_sequence
                st = seq[min(j["polls"], len(seq) - 1)]
                j["polls"] += 1
                j["obj"]["properties"]["status"] = st
                return 200, {"runId": m.group(1), "status": st, "target": "gpu-cluster", "logFiles": {},
                             "startTimeUtc": "2024-01-01T00:00:00Z", "endTimeUtc": "2024-01-01T00:01:00Z"}, {}
        if not path.startswith(WS_PREFIX):
            return (*arm_error("NotFound", f"fake: no route {method} {path}", 404), {})
        rel = path[len(WS_PREFIX):]
        h = {}
        if rel == "" and method == "GET":
            return 200, self.workspace_json(), h
        m = re.fullmatch(r"/(codes|environments|data|models|components)/([^/]+)/versions", rel)
        if m and method == "GET":
            if m.group(1) == "codes" and self.code_exists:
                return 200, {"value": [self.code_version_json(m.group(2), "1")]}, h
            return 200, {"value": []}, h
        m = re.fullmatch(r"/codes/([^/]+)/versions/([^/]+)/startPendingUpload", rel)
        if m and method == "POST":
            blob_uri = f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}"
            return 200, {
                "blobReferenceForConsumption": {
                    "blobUri": blob_uri,
                    "storageAccountArmId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
                    "credential": {"credentialType": "SAS", "sasUri": blob_uri + "?sv=2021-08-06&sig=fake"},
                },
                "pendingUploadId": str(uuid.uuid4()),
                "pendingUploadType": "TemporaryBlobReference",
            }, h
        m = re.fullmatch(r"/(codes|environments|data|models|components)/([^/]+)/versions/([^/]+)", rel)
        if m:
            kind, name, ver = m.groups()
            if method == "PUT":
                props = (body or {}).get("properties", {})
                if kind == "environments":
                    props.setdefault("environmentType", "UserCreated")
                if kind == "models":  # what the service fills in, and the SDK reads back
                    for key in ("flavors", "properties", "tags"):
                        props[key] = props.get(key) or {}
                obj = {"id": f"{WS_PREFIX}/{kind}/{name}/versions/{ver}", "name": ver,
                       "type": f"Microsoft.MachineLearningServices/workspaces/{kind}/versions",
                       "properties": props, "systemData": self.system_data()}
                self.assets[rel] = obj
                return 200, obj, h
            if method == "GET":
                if rel in self.assets:
                    return 200, self.assets[rel], h
                if kind == "codes" and self.code_exists:
                    return 200, self.code_version_json(name, ver), h
                return (*arm_error("UserError", f"{kind} {name}:{ver} not found", 404), h)
        if rel == "/datastores" and method == "GET":
            return 200, {"value": [self.datastore_json()]}, h
        if rel == "/datastores/workspaceblobstore" and method == "GET":
            return 200, self.datastore_json(), h
        if rel == "/datastores/workspaceblobstore/listSecrets" and method == "POST":
            return 200, {"secretsType": "Sas", "sasToken": "sv=2021-08-06&sig=fake"}, h
        m = re.fullmatch(r"/jobs/([^/]+)", rel)
        if m:
            name = m.group(1)
            if method == "PUT":
                obj = dict(body)
                obj.update(id=f"{WS_PREFIX}/jobs/{name}", name=name,
                           type="Microsoft.MachineLearningServices/workspaces/jobs", systemData=self.system_data())
                obj["properties"]["status"] = "NotStarted"
                obj["properties"]["services"] = {"Studio": {"endpoint": f"https://ml.azure.com/runs/{name}", "jobServiceType": "Studio"}}
                self.jobs[name] = {"obj": obj, "polls": 0}
                return 201, obj, h
            if method == "GET":
                if name not in self.jobs:
                    return (*arm_error("UserError", f"job {name} not found", 404), h)
                j = self.jobs[name]
                seq = self.job_status_sequence
                j["obj"]["properties"]["status"] = seq[min(j["polls"], len(seq) - 1)]
                j["polls"] += 1
                return 200, j["obj"], h
        m = re.fullmatch(r"/jobs/([^/]+)/cancel", rel)
        if m and method == "POST":
            self.jobs[m.group(1)]["obj"]["properties"]["status"] = "CancelRequested"
            # LRO: Location must be the *public* https URL (the transport rewrites it); http would trip the auth policy
            return 202, b"", {"Location": f"https://management.azure.com{WS_PREFIX}/operationResults/cancel-{m.group(1)}?api-version=2023-04-01-preview",
                              "Retry-After": "0"}
        if rel.startswith("/operationResults/") and method == "GET":
            return 200, {"status": "Succeeded"}, h
        m = re.fullmatch(r"/onlineEndpoints/([^/]+)(/deployments/([^/]+))?", rel)
        if m:  # a managed online endpoint or deployment: the long-running create is done at once
            name = m.group(3) or m.group(1)
            if method in ("PUT", "PATCH"):
                obj = dict(body or {})
                obj.update(id=f"{WS_PREFIX}{rel}", name=name, location="eastus", systemData=self.system_data(),
                           type="Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
                           + ("/deployments" if m.group(2) else ""))
                props = obj.setdefault("properties", {})
                props["provisioningState"] = "Succeeded"
                if not m.group(2):
                    props["scoringUri"] = f"https://{name}.eastus.inference.ml.azure.com/score"
                else:  # what the service fills in for a deployment
                    props.setdefault("scaleSettings", {"scaleType": "Default"})
                self.assets[rel] = obj
                return 200, obj, h
            if method == "GET":
                if rel in self.assets:
                    return 200, self.assets[rel], h
                return (*arm_error("ResourceNotFound", f"{name} not found", 404), h)
        if rel == "/computes" and method == "GET":
            return 200, {"value": [self.compute_json(n) for n in self.computes]}, h
        m = re.fullmatch(r"/computes/([^/]+)", rel)
        if m and method == "GET":
            if m.group(1) not in self.computes:
                return (*arm_error("ResourceNotFound", f"compute {m.group(1)} not found", 404), h)
            return 200, self.compute_json(m.group(1)), h
        return (*arm_error("NotFound", f"fake: no route {method} {rel}", 404), h)

    # ------------------------------------------------------------------ a sweep job's trials, as Azure ML runs them
    def trials(self, job_name, mlflow_uri):
        """Each trial of a submitted sweep job as Azure ML starts it: its own MLflow run (a child of the
        sweep's run, in the job's experiment; the trial's $MLFLOW_RUN_ID) and its command with every
        ${{search_space.<name>}} filled in as Azure ML writes a value: a string as it is, anything else
        as Python's str() (so True, and ['q_proj'] for a list)."""
        import itertools

        from mlflow.tracking import MlflowClient

        props = self.jobs[job_name]["obj"]["properties"]
        names = list(props["searchSpace"])
        client = MlflowClient(mlflow_uri)
        found = client.get_experiment_by_name(props["experimentName"])
        experiment = found.experiment_id if found else client.create_experiment(props["experimentName"])
        sweep_run = client.create_run(experiment, run_name=job_name).info.run_id
        trials = []
        grid = [props["searchSpace"][name][1][0] for name in names]  # ["choice", [[v1, v2]]]
        for index, combo in enumerate(itertools.product(*grid)):
            command = props["trial"]["command"]
            for name, value in zip(names, combo):
                command = command.replace("${{search_space.%s}}" % name, value if isinstance(value, str) else str(value))
            run = client.create_run(experiment, run_name=f"{job_name}_{index}", tags={"mlflow.parentRunId": sweep_run})
            trials.append({"run_id": run.info.run_id, "values": dict(zip(names, combo)), "command": command})
        return trials

    def primary_metric(self, job_name, run_id, mlflow_uri):
        """What the sweep reads to compare a trial (Bandit policy, best trial): the objective's primary
        metric, per step, from the trial's own run (not from any run nested under it)."""
        from mlflow.tracking import MlflowClient

        metric = self.jobs[job_name]["obj"]["properties"]["objective"]["primaryMetric"]
        return sorted((m.step, m.value) for m in MlflowClient(mlflow_uri).get_metric_history(run_id, metric))

    # ------------------------------------------------------------------ blob emulation (enough for uploads)
    def blob(self, method, path, q, raw, headers):
        now = formatdate(usegmt=True)
        base = {"ETag": '"0x1"', "Last-Modified": now, "x-ms-version": "2021-08-06"}
        if q.get("restype") == ["container"] and q.get("comp") == ["list"]:
            prefix = q.get("prefix", [""])[0]
            items = "".join(f"<Blob><Name>{k.split('/', 2)[2]}</Name><Properties><Content-Length>{len(v)}</Content-Length></Properties><Metadata/></Blob>"
                            for k, v in self.blobs.items() if k.split("/", 2)[2].startswith(prefix))
            xml = f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Prefix>{prefix}</Prefix><Blobs>{items}</Blobs><NextMarker/></EnumerationResults>'
            return 200, xml, {**base, "Content-Type": "application/xml"}
        meta = {k: v for k, v in headers.items() if k.lower().startswith("x-ms-meta-")}
        if method == "PUT" and q.get("comp") == ["metadata"]:
            self.blob_meta[path] = meta
            return 200, b"", base
        if method == "PUT":
            self.blobs[path] = raw
            self.blob_meta[path] = meta
            return 201, b"", {**base, "x-ms-request-server-encrypted": "true"}
        if method in ("HEAD", "GET"):
            if path in self.blobs:
                return 200, self.blobs[path], {**base, **self.blob_meta.get(path, {}), "Content-Length": str(len(self.blobs[path])),
                                               "x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"}
            return 404, b"", {**base, "x-ms-error-code": "BlobNotFound"}
        return 400, b"", base

    # ------------------------------------------------------------------ canned bodies
    def system_data(self):
        return {"createdAt": "2024-01-01T00:00:00Z", "createdBy": "fake", "createdByType": "User",
                "lastModifiedAt": "2024-01-01T00:00:00Z", "lastModifiedBy": "fake", "lastModifiedByType": "User"}

    def workspace_json(self):
        return {
            "id": WS_PREFIX, "name": WS, "type": "Microsoft.MachineLearningServices/workspaces", "location": "eastus",
            "kind": "Default",
            "properties": {
                "friendlyName": WS, "workspaceId": "11111111-1111-1111-1111-111111111111",
                "discoveryUrl": "https://eastus.api.azureml.ms/discovery",
                "mlFlowTrackingUri": f"azureml://eastus.api.azureml.ms/mlflow/v1.0{WS_PREFIX}",
                "storageAccount": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
                "provisioningState": "Succeeded",
            },
        }

    def datastore_json(self):
        return {
            "id": f"{WS_PREFIX}/datastores/workspaceblobstore", "name": "workspaceblobstore",
            "type": "Microsoft.MachineLearningServices/workspaces/datastores",
            "properties": {"datastoreType": "AzureBlob", "accountName": ACCOUNT, "containerName": CONTAINER,
                           "endpoint": "core.windows.net", "protocol": "https", "isDefault": True,
                           "credentials": {"credentialsType": "AccountKey"}},
            "systemData": self.system_data(),
        }

    def code_version_json(self, name, ver):
        return {"id": f"{WS_PREFIX}/codes/{name}/versions/{ver}", "name": ver,
                "type": "Microsoft.MachineLearningServices/workspaces/codes/versions",
                "properties": {"codeUri": f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/LocalUpload/{name}/src",
                               "isAnonymous": True},
                "systemData": self.system_data()}

    def compute_json(self, name):
        return {"id": f"{WS_PREFIX}/computes/{name}", "name": name, "location": "eastus",
                "type": "Microsoft.MachineLearningServices/workspaces/computes",
                "properties": {"computeType": "AmlCompute", "provisioningState": "Succeeded",
                               "properties": {"vmSize": self.computes.get(name, "STANDARD_NC6"), "scaleSettings": {"maxNodeCount": 4, "minNodeCount": 0}}}}


def make_ml_client(fake, **kw):
    from azure.ai.ml import MLClient

    return MLClient(FakeCredential(), SUB, RG, WS, transport=LocalTransport(fake.port), enable_telemetry=False, **kw)
