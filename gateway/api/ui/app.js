// The job page: the caller's jobs and, per job (#job=<id> or ?job=<id>), its previews, logs and output;
// for a succeeded job, its classes to tick and a form that starts the next job on them (input_job_id).
// Every data call sends the token kept in this tab's sessionStorage; images are fetched with it and
// shown through blob: URLs, since an <img> cannot send an Authorization header. Text from the API is
// only ever set as textContent or an attribute. Data attributes (data-state, data-loaded,
// data-natural-width, data-class, data-next-request, data-chain) let a test read from a DOM dump what
// the page showed and what it would send.
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

  // body: the API's error object ({code, status, message, errors}) when the answer was one.
  class ApiError extends Error {
    constructor(status, message, body = null) { super(message); this.status = status; this.body = body; }
  }

  // GET by default; init adds a method, headers and a body (the token header is always this tab's).
  async function api(path, as = "json", init = {}) {
    const headers = { ...(init.headers || {}), Authorization: "Bearer " + token() };
    const response = await fetch(API + path, { ...init, headers });
    if (response.status === 401) {
      forget("The token was refused (401): enter a valid one.");
      throw new ApiError(401, "unauthorized");
    }
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      let body = null;
      try {
        body = await response.json();
        message = body.message || message;
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, message, body);
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

  // A chained job's parent, and the jobs chained on this one, as links to their pages.
  function lineage(job) {
    const rows = [];
    if (job.input_job_id) {
      const chose = [];
      if (job.select_classes && job.select_classes.length) chose.push("classes " + job.select_classes.join(", "));
      if (job.ref_class != null) chose.push("reference: class " + job.ref_class);
      rows.push(["Chained on", [el("a", { href: jobRef(job.input_job_id), "data-parent": job.input_job_id }, job.input_job_id),
        chose.length ? " (" + chose.join("; ") + ")" : ""]]);
    }
    if (job.children && job.children.length) {
      rows.push(["Chained jobs", job.children.flatMap((child, index) => [index ? ", " : "",
        el("a", { href: jobRef(child), "data-child": child }, child)])]);
    }
    return rows;
  }

  function renderFacts(job) {
    const facts = [["State", job.status], ["Progress", progress(job)], ["Mode", job.mode], ["Ranks", job.num_mpi],
      ["Submitted", age(job.accepted_at) + " ago"], ["Slurm", [job.slurm && job.slurm.main_job_id, job.slurm && job.slurm.state].filter(Boolean).join(" ")],
      ["Message", job.message], ...lineage(job)];
    const shown = (value) => Array.isArray(value) ? value : [value === 0 ? "0" : String(value || "–")];
    $("job-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, ...shown(value))]));
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
    renderChain(job);
    document.body.dataset.latestIteration = listing.latest_iteration ?? "";

    await Promise.all(shown.map((s) => s.loaded));
    if (jobId === currentJob) document.body.dataset.ready = "job";
    return job;
  }

  // -- the next job: classes of a finished job, and a job chained on them --------------------------------

  // What the form suggests after each kind of parent, and the relion_refine options it starts from.
  const NEXT_MODE = { "2d": "3d", "3d": "autorefine", "autorefine": "autorefine" };
  const PRESETS = {
    "2d": { o: "Class2D/run", K: 10, iter: 25, tau2_fudge: 2 },
    "3d": { o: "Class3D/run", ref: "ref.mrc", K: 2, iter: 25 },
    "autorefine": { o: "Refine3D/run", ref: "ref.mrc" },
  };
  // The parent's options that mean the same in every mode (its particles, their CTF, how images are
  // read) go on to the next job; everything mode-specific comes from PRESETS.
  const CARRIED = new Set(["particle_diameter", "ctf", "ctf_intact_first_peak", "ctf_phase_flipped", "only_flip_phases",
    "zero_mask", "flatten_solvent", "offset_range", "offset_step", "norm", "scale", "no_norm", "no_scale", "pool",
    "dont_combine_weights_via_disc", "no_parallel_disc_io", "preread_images", "random_seed"]);

  // The chain form of the job shown: {key, job, counts, edited (the user typed in the flags), idempotency}.
  let chain = null;

  // "1,3" -> [1, 3]: whole numbers >= 1 only.
  const classNumbers = (text) => (text || "").split(",").map((t) => t.trim()).filter((t) => /^[1-9][0-9]*$/.test(t)).map(Number);

  function defaultFlags(mode, refClass, parentFlags) {
    const flags = { ...PRESETS[mode] };
    if (refClass != null) delete flags.ref;  // ref_class makes the gateway set --ref
    let threads = 1;
    const carried = {};
    for (const [key, value] of Object.entries(parentFlags || {})) {
      const name = key.replace(/^-+/, "").replace(/-/g, "_");
      if (name === "j") threads = value;
      else if (CARRIED.has(name)) carried[name] = value;
    }
    return { ...flags, j: threads, ...carried };
  }

  // The output prefix the parent was given: its output_url is <prefix>/<job_id>/.
  function parentPrefix(job) {
    const url = job.output_url || "";
    const tail = "/" + job.job_id + "/";
    return url.endsWith(tail) ? url.slice(0, -tail.length) : "";
  }

  function randomKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));  // crypto.randomUUID needs a secure context
    return "page-" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function setValue(node, value) {  // the attribute too, so a DOM dump shows it
    node.defaultValue = value;
    node.value = value;
  }

  const refClass = () => {
    const picked = $("chain-form").querySelector('input[name="ref_class"]:checked');
    return $("next-mode").value !== "2d" && picked && picked.value ? Number(picked.value) : null;
  };

  function prefillFlags() {
    setValue($("next-flags"), JSON.stringify(defaultFlags($("next-mode").value, refClass(), chain.job.flags), null, 2));
  }

  // Called with each rendering of a job: builds the form once per job (and #classes= / #ref_class=).
  function renderChain(job) {
    const outputs = job.status === "succeeded" && job.metadata && job.metadata.outputs;
    if (!outputs || !outputs.class_particles) {
      chain = null;
      $("chain").hidden = true;
      document.body.dataset.chain = "none";
      return;
    }
    const params = new URLSearchParams(location.hash.slice(1));
    const key = [job.job_id, params.get("classes") || "", params.get("ref_class") || ""].join("|");
    if (chain && chain.key === key) return;  // a re-render keeps what the user chose
    buildChain(job, outputs, key, classNumbers(params.get("classes")), classNumbers(params.get("ref_class"))[0]);
  }

  function buildChain(job, outputs, key, wanted, wantedRef) {
    const counts = Object.entries(outputs.class_particles).map(([n, c]) => [Number(n), Number(c)]).sort((a, b) => a[0] - b[0]);
    const total = counts.reduce((sum, [, c]) => sum + c, 0);
    const maps = outputs.class_maps || {};
    const hasMaps = Object.keys(maps).length > 0;
    chain = { key, job, counts, total, edited: false, idempotency: randomKey(), sent: null };

    $("chain-class-head").replaceChildren(...["", "Class", "Particles", "Share", ...(hasMaps ? ["Reference"] : [])].map((h) => el("th", {}, h)));
    $("chain-class-rows").replaceChildren(...counts.map(([n, count]) => {
      const tick = count > 0 && wanted.includes(n);
      const box = el("input", { type: "checkbox", name: "class", id: "class-" + n, value: String(n), disabled: count === 0,
        "data-class": n, "data-particles": count, "data-checked": String(tick) });
      if (count === 0) box.title = "no particles in this class";
      box.checked = box.defaultChecked = tick;
      const cells = [
        el("td", {}, box),
        el("td", {}, el("label", { htmlFor: box.id }, "class " + n)),
        el("td", { className: "num" }, String(count)),
        el("td", { className: "num" }, total ? (100 * count / total).toFixed(1) + " %" : "–"),
      ];
      if (hasMaps) {
        const radio = el("input", { type: "radio", name: "ref_class", id: "ref-" + n, value: String(n), disabled: !maps[n],
          title: maps[n] || "no map of this class", "data-ref-class": n, "data-map": maps[n] ? "true" : "false" });
        radio.checked = radio.defaultChecked = Boolean(maps[n]) && wantedRef === n;
        cells.push(el("td", {}, radio, " ", el("label", { htmlFor: radio.id }, "reference: class " + n)));
      }
      return el("tr", { "data-class-row": n }, ...cells);
    }));
    $("chain-ref-none").hidden = !hasMaps;
    $("ref-none").checked = $("ref-none").defaultChecked = !$("chain-form").querySelector('input[data-ref-class]:not([data-ref-class=""]):checked');

    const mode = NEXT_MODE[outputs.mode || job.mode] || "3d";
    for (const option of $("next-mode").options) option.selected = option.defaultSelected = option.value === mode;
    setValue($("next-num-mpi"), "3");
    setValue($("next-workspace"), job.workspace_id || "");
    setValue($("next-output"), parentPrefix(job));
    prefillFlags();
    $("chain-result").hidden = true;
    $("chain-result").replaceChildren();
    $("chain").hidden = false;
    updateNext();
    document.body.dataset.chain = "ready";
  }

  // The body Submit would send, from the form as it is now; null (and the reason shown) if the flags are not JSON.
  function nextRequest() {
    const form = $("chain-form");
    const boxes = [...form.querySelectorAll("input[data-class]")];
    for (const box of boxes) box.dataset.checked = String(box.checked);
    const selected = boxes.filter((box) => box.checked && !box.disabled).map((box) => Number(box.dataset.class));
    const particles = chain.counts.filter(([n]) => selected.includes(n)).reduce((sum, [, c]) => sum + c, 0);
    $("chain-summary").textContent = selected.length
      ? selected.length + (selected.length === 1 ? " class" : " classes") + " ticked: " + particles + " of " + chain.total + " particles go to the next job."
      : "No class ticked: all " + chain.total + " particles go to the next job.";
    // A 2D job takes no reference; a class without a map can be none.
    for (const radio of form.querySelectorAll('input[name="ref_class"]')) {
      radio.disabled = $("next-mode").value === "2d" || radio.dataset.map === "false";
    }

    let flags;
    try {
      flags = JSON.parse($("next-flags").value);
      if (flags === null || typeof flags !== "object" || Array.isArray(flags)) throw new Error("must be a JSON object");
    } catch (error) {
      return { problem: "Flags: " + error.message };
    }
    const ranks = $("next-num-mpi").value.trim();
    const body = { user_id: chain.job.user_id, workspace_id: $("next-workspace").value.trim(), input_job_id: chain.job.job_id };
    if (selected.length) body.select_classes = selected;
    const ref = refClass();
    if (ref != null) body.ref_class = ref;
    body.output_s3_prefix = $("next-output").value.trim();
    body.mode = $("next-mode").value;
    body.num_mpi = /^[0-9]+$/.test(ranks) ? Number(ranks) : ranks;  // anything else: the API says what is wrong
    body.flags = flags;
    return { body };
  }

  function updateNext() {
    const { body, problem } = nextRequest();
    const form = $("chain-form");
    $("next-problem").hidden = !problem;
    $("next-problem").textContent = problem || "";
    $("next-submit").disabled = Boolean(problem);
    if (problem) {
      form.dataset.nextRequest = "";
      form.dataset.nextProblem = problem;
      return null;
    }
    const text = JSON.stringify(body);
    if (text !== form.dataset.nextRequest) chain.idempotency = randomKey();  // a new request, a new key
    form.dataset.nextRequest = text;
    delete form.dataset.nextProblem;
    return body;
  }

  function onChainChange(event) {
    if (!chain) return;
    const target = event.target;
    if (target.id === "next-flags") {
      chain.edited = true;
    } else if (target.id === "next-mode" || target.name === "ref_class") {
      if (!chain.edited) {
        prefillFlags();
      } else if (refClass() != null) {
        // The user's own flags: only take out a ref the chosen class map replaces (the API refuses both).
        try {
          const flags = JSON.parse($("next-flags").value);
          if (flags && typeof flags === "object" && "ref" in flags) {
            delete flags.ref;
            setValue($("next-flags"), JSON.stringify(flags, null, 2));
          }
        } catch (_) { /* not JSON yet: nextRequest says so */ }
      }
    }
    updateNext();
  }

  async function submitNext(event) {
    event.preventDefault();
    if (!chain) return;
    const body = updateNext();
    if (!body) return;
    const parent = chain.job.job_id;
    const result = $("chain-result");
    $("next-submit").disabled = true;
    result.hidden = false;
    result.dataset.outcome = "pending";
    delete result.dataset.job;
    result.replaceChildren("Submitting…");
    try {
      const job = await api("/jobs", "json", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": chain.idempotency },
        body: JSON.stringify(body),
      });
      result.dataset.outcome = "submitted";
      result.dataset.job = job.job_id;
      result.replaceChildren("Started ", el("a", { href: jobRef(job.job_id), "data-job": job.job_id }, job.job_id), " (" + job.status + ").");
      // The parent's page now lists it among its chained jobs.
      if (currentJob === parent) api("/jobs/" + encodeURIComponent(parent)).then((fresh) => { if (currentJob === parent) renderFacts(fresh); }, () => {});
    } catch (error) {
      if (error.status === 401) return;  // forget() has shown the token form
      const answer = error.body;
      result.dataset.outcome = "error";
      result.replaceChildren(answer && answer.code ? answer.code + " " + (answer.status || "") + ": " + (answer.message || "") : error.message);
    } finally {
      if (chain) $("next-submit").disabled = !updateNext();
    }
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
      chain = null;
      $("job-extra").hidden = true;
      $("chain").hidden = true;
      delete document.body.dataset.ready;
      delete document.body.dataset.jobState;
      delete document.body.dataset.chain;
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
    $("chain-form").addEventListener("input", onChainChange);
    $("chain-form").addEventListener("change", onChainChange);
    $("chain-form").addEventListener("submit", submitNext);
    $("next-reset").addEventListener("click", () => {
      if (!chain) return;
      chain.edited = false;
      prefillFlags();
      updateNext();
    });
    $("job-actions").addEventListener("click", (event) => {
      const what = event.target.dataset && event.target.dataset.show;
      if (what) showExtra(what);
    });
    window.addEventListener("hashchange", () => { takeFragmentToken(); start(); });
    start();
  });
})();
