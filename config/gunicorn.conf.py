"""gunicorn settings for `certwright serve` behind a load balancer.

Used as:  certwright serve --gunicorn-config /etc/certwright/gunicorn.conf.py

The file is gunicorn's own format (https://docs.gunicorn.org/en/stable/settings.html) and
applies to both listeners of one `certwright serve` (ACME over HTTPS; OCSP, CRLs and /healthz
over HTTP). certwright keeps what makes each listener what it is: the bind addresses (`--listen`,
`--https-listen`, `[server]` in certwright.toml), TLS, and the worker class (gunicorn's asyncio
worker, one request at a time per process so that each PKCS#11 session has one user). Names
gunicorn does not know are ignored; a value gunicorn would refuse stops `serve` with one line.

Every value can be overridden from the environment (e.g. in /etc/certwright/certwright.env).
"""

import os

# Processes per listener. Each opens its own HSM session and signs one request at a time, so
# one per core is the ceiling that helps; a network HSM may want a few more (it waits on I/O).
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))

# A request (an HSM signature, a database commit) takes milliseconds; a worker silent for this
# long is stuck (an HSM or database that stopped answering) and is replaced.
timeout = int(os.environ.get("CERTWRIGHT_GUNICORN_TIMEOUT", "60"))
# On SIGTERM (systemd stop, a deploy) workers finish what they are answering first.
graceful_timeout = int(os.environ.get("CERTWRIGHT_GUNICORN_GRACEFUL_TIMEOUT", "30"))
# Above the load balancer's idle timeout would make the balancer reuse connections we close;
# keep it below (AWS ALB: 60 s, HAProxy `timeout http-keep-alive` default: the request timeout).
keepalive = int(os.environ.get("CERTWRIGHT_GUNICORN_KEEPALIVE", "5"))
# Recycle a worker after this many requests (jittered so they do not all restart at once):
# bounds any slow growth of a long-lived process at the cost of one HSM login per recycle.
max_requests = int(os.environ.get("CERTWRIGHT_GUNICORN_MAX_REQUESTS", "100000"))
max_requests_jitter = int(os.environ.get("CERTWRIGHT_GUNICORN_MAX_REQUESTS_JITTER", "10000"))
# Bursts of new connections from a balancer: a short queue drops SYNs (a 1 s client retry).
backlog = 2048

# Logs to stdout/stderr for journald or the container runtime; one access line per request
# (OCSP requests are never access-logged: thousands a second).
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("CERTWRIGHT_GUNICORN_LOGLEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'

# The balancer's addresses, whose X-Forwarded-For/-Proto headers are believed (gunicorn's
# default: 127.0.0.1 only). Set it to the balancers' addresses, never "*" on an open network.
forwarded_allow_ips = os.environ.get("CERTWRIGHT_GUNICORN_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# Requests certwright answers are small: JWS bodies, OCSP requests, CSRs.
limit_request_line = 8190
limit_request_fields = 100
