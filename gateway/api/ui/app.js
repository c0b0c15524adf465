// The job page: the caller's jobs and, per job (#job=<id> or ?job=<id>), its previews, logs and output.
// Every data call sends the token kept in this tab's sessionStorage; images are fetched with it and
// shown through blob: URLs, since an <img> cannot send an Authorization header. Text from the API is
// only ever set as textContent. Data attributes (data-state, data-loaded, data-natural-width) let a
// test read from a DOM dump what the page showed.
"use strict";

(() => {
  const API = new URL("../", document.baseURI).pathname.replace(/\/$/, "");  // the page is <base>/ui/
  const TOKEN_KEY = "relion-gateway-token";
  const MIN_POLL_S = 2;
  const $ = (id) => document.getElementById(id);

  const images = new Map();  // "<job>/<name>" -> blob: URL; a name's bytes never change
  let currentJob = null;
  let pollTimer = null;
  let refreshes = 0;  // only the latest refresh schedules the next one

  // -- the token ------------------------------------------------------------------------------

  // #token=... (a link a script can open) goes to sessionStorage and out of the address bar.
  function takeFragmentToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (!params.has("token")) return;
    sessionStorage.setItem(TOKEN_KEY, params.get("token").trim());
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    document.body.dataset.tokenFrom = "fragment";
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  function forget(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    for (const url of images.values()) URL.revokeObjectURL(url);
    images.clear();
    clearTimeout(pollTimer);
    show(message || "Token forgotten.");
    start();
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, as = "json") {
    const response = await fetch(API + path, { headers: { Authorization: "Bearer " + token() } });
    if (response.status === 401) {
      forget("The token was refused (401): enter a valid one.");
      throw new ApiError(401, "unauthorized");
    }
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, message);
    }
    return response[as]();
  }

  // -- small helpers ----------------------------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name.startsWith("data-")) node.dataset[name.slice(5).replace(/-(\w)/g, (_, c) => c.toUpperCase())] = value;
      else node[name] = value;
    }
    node.append(...children);
    return node;
  }

  const show = (message) => { $("status").textContent = message || ""; };
  const jobRef = (id) => "#job=" + encodeURIComponent(id);

  function selectedJob() {
    return new URLSearchParams(location.hash.slice(1)).get("job") || new URLSearchParams(location.search).get("job");
  }

  function age(seconds) {
    const s = Math.max(0, Date.now() / 1000 - seconds);
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  function progress(job) {
    const p = job.progress || {};
    const parts = [];
    if (p.iteration != null) parts.push("iteration " + p.iteration + (p.iterations_planned ? "/" + p.iterations_planned : ""));
    if (p.resolution_angstrom != null) parts.push(Number(p.resolution_angstrom).toFixed(1) + " Å");
    if (p.converged) parts.push("converged");
    return parts.join(", ") || "–";
  }

  // -- the list -------------------------------------------------------------------------------------

  async function renderJobs() {
    const list = await api("/jobs?page_size=100");
    const rows = list.jobs.map((job) => el("tr", { "data-job": job.job_id, "data-state": job.status },
      el("td", {}, el("a", { href: jobRef(job.job_id) }, job.job_id)),
      el("td", { className: "state state-" + job.status }, job.status),
      el("td", {}, progress(job)),
      el("td", {}, job.mode),
      el("td", { title: new Date(job.accepted_at * 1000).toISOString() }, age(job.accepted_at)),
    ));
    $("job-rows").replaceChildren(...rows);
    $("jobs-empty").hidden = rows.length > 0;
    return list.jobs;
  }

  // -- one job ----------------------------------------------------------------------------------------

  // fetch -> blob -> object URL; data-loaded says whether the browser decoded it.
  function previewImage(jobId, preview) {
    const img = el("img", { alt: preview.name, width: preview.width, height: preview.height,
      "data-name": preview.name, "data-kind": preview.kind, "data-loaded": "pending" });
    const key = jobId + "/" + preview.name;
    let done;
    const loaded = new Promise((resolve) => { done = resolve; });
    img.onload = () => { img.dataset.loaded = "true"; img.dataset.naturalWidth = img.naturalWidth; done(true); };
    img.onerror = () => { img.dataset.loaded = "false"; done(false); };
    const source = images.has(key) ? Promise.resolve(images.get(key))
      : api("/jobs/" + encodeURIComponent(jobId) + "/previews/" + encodeURIComponent(preview.name), "blob")
        .then((blob) => { const url = URL.createObjectURL(blob); images.set(key, url); return url; });
    source.then((url) => { img.src = url; }, (error) => { img.dataset.loaded = "false"; img.title = error.message; done(false); });
    return { figure: el("figure", {}, img, el("figcaption", {}, preview.kind)), loaded };
  }

  function figures(jobId, previews) {
    const made = previews.map((p) => previewImage(jobId, p));
    return { nodes: made.map((m) => m.figure), loaded: Promise.all(made.map((m) => m.loaded)) };
  }

  function renderHistory(jobId, byIteration) {
    const wasOpen = new Set([...$("history").querySelectorAll("details[open]")].map((d) => d.dataset.iteration));
    const iterations = [...byIteration.keys()].sort((a, b) => b - a);
    $("history").replaceChildren(...iterations.map((iteration) => {
      const previews = byIteration.get(iteration);
      const body = el("div", { className: "previews" });
      const details = el("details", { "data-iteration": iteration },
        el("summary", {}, "Iteration " + iteration + ": " + previews.map((p) => p.kind).join(", ")), body);
      // Images of an iteration are fetched only when it is opened.
      details.addEventListener("toggle", () => {
        if (details.open && !body.childElementCount) body.append(...figures(jobId, previews).nodes);
      });
      details.open = wasOpen.has(String(iteration));  // a poll's re-render keeps what the user opened
      return details;
    }));
  }

  function renderFacts(job) {
    const facts = [["State", job.status], ["Progress", progress(job)], ["Mode", job.mode], ["Ranks", job.num_mpi],
      ["Submitted", age(job.accepted_at) + " ago"], ["Slurm", [job.slurm && job.slurm.main_job_id, job.slurm && job.slurm.state].filter(Boolean).join(" ")],
      ["Message", job.message]];
    $("job-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value === 0 ? "0" : String(value || "–"))]));
  }

  async function renderJob(jobId) {
    const path = "/jobs/" + encodeURIComponent(jobId);
    const [job, listing] = await Promise.all([api(path), api(path + "/previews")]);
    if (jobId !== currentJob) return null;  // another job was chosen meanwhile
    document.body.dataset.jobState = job.status;
    $("job-title").textContent = job.job_id;
    renderFacts(job);

    const byIteration = new Map();
    for (const p of listing.previews) byIteration.set(p.iteration, [...(byIteration.get(p.iteration) || []), p]);
    const latest = (byIteration.get(listing.latest_iteration) || []).filter((p) => p.kind !== "history");
    const histories = listing.previews.filter((p) => p.kind === "history");
    const plots = histories.length ? [histories[histories.length - 1]] : [];

    $("latest-iteration").textContent = listing.latest_iteration == null ? "" : "(" + listing.latest_iteration + ")";
    $("no-previews").hidden = listing.previews.length > 0;
    const shown = [figures(jobId, latest), figures(jobId, plots)];
    $("latest").replaceChildren(...shown[0].nodes);
    $("resolution").replaceChildren(...shown[1].nodes);
    renderHistory(jobId, byIteration);
    document.body.dataset.latestIteration = listing.latest_iteration ?? "";

    await Promise.all(shown.map((s) => s.loaded));
    if (jobId === currentJob) document.body.dataset.ready = "job";
    return job;
  }

  // Script, logs and the output link, on demand (a button, or #job=<id>&show=<panel> in the URL).
  const PANELS = {
    "script": ["Main script", "/script"],
    "script-archive": ["Archive script", "/script?which=archive"],
    "log-out": ["RELION stdout (last 500 lines)", "/logs?stream=out&tail=500"],
    "log-err": ["RELION stderr (last 500 lines)", "/logs?stream=err&tail=500"],
    "output": ["Output", "/output"],
  };

  async function showExtra(what) {
    if (!Object.hasOwn(PANELS, what) || !currentJob) return;
    const [title, suffix] = PANELS[what];
    const call = "/jobs/" + encodeURIComponent(currentJob) + suffix;
    $("job-extra").hidden = false;
    $("job-extra").dataset.panel = what;
    $("job-extra-title").textContent = title;
    $("job-text").textContent = "";
    $("job-output").replaceChildren();
    try {
      if (what !== "output") {
        $("job-text").textContent = await api(call, "text");
        return;
      }
      const link = await api(call);
      const url = new URL(link.url);
      if (url.protocol !== "https:" && url.protocol !== "http:") throw new Error("not an http(s) URL");
      $("job-output").append(el("a", { href: url.href, rel: "noopener noreferrer", id: "output-link" }, "output.tar.gz"),
        " (" + (link.bytes != null ? link.bytes + " bytes, " : "") + "link valid " + Math.round(link.expires_in / 60) + " min)");
    } catch (error) {
      $("job-text").textContent = error.message;
    }
  }

  // -- putting it together --------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(pollTimer);
    const generation = ++refreshes;
    const jobId = selectedJob();
    const firstLook = jobId !== currentJob;
    if (firstLook) {
      currentJob = jobId;
      $("job-extra").hidden = true;
      delete document.body.dataset.ready;
      delete document.body.dataset.jobState;
    }
    $("job").hidden = !jobId;
    try {
      const [jobs, job] = await Promise.all([renderJobs(), jobId ? renderJob(jobId) : null]);
      show("");
      const panel = new URLSearchParams(location.hash.slice(1)).get("show");
      if (firstLook && job && panel) await showExtra(panel);
      // Poll while something shown can still change: next_poll_s is null once a job has ended.
      const waits = (jobId ? [job] : jobs).filter(Boolean).map((j) => j.next_poll_s).filter((s) => s != null);
      if (waits.length && generation === refreshes) pollTimer = setTimeout(refresh, Math.max(MIN_POLL_S, Math.min(...waits)) * 1000);
    } catch (error) {
      if (error.status !== 401) show(error.message);
      if (jobId && error.status === 404) document.body.dataset.jobState = "not-found";
    }
  }

  function start() {
    const signedIn = Boolean(token());
    $("login").hidden = signedIn;
    $("app").hidden = !signedIn;
    $("forget").hidden = !signedIn;
    $("who").textContent = signedIn ? "token " + token().split("_").slice(0, 2).join("_") + "_…" : "";
    if (signedIn) refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeFragmentToken();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
      $("token-input").value = "";
      start();
    });
    $("forget").addEventListener("click", () => forget());
    $("reload").addEventListener("click", () => refresh());
    $("job-actions").addEventListener("click", (event) => {
      const what = event.target.dataset && event.target.dataset.show;
      if (what) showExtra(what);
    });
    window.addEventListener("hashchange", () => { takeFragmentToken(); start(); });
    start();
  });
})();
