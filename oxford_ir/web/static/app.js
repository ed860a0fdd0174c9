// oxford-ir search page: upload or pick a query, draw a box, show the top-k results, click one to search with it.
// Plain DOM code, no build step. Every text from the server goes through textContent, never innerHTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const config = {
    k: Number(body.dataset.k),
    maxK: Number(body.dataset.maxK),
    examples: Number(body.dataset.examples),
    maxThumbSize: Number(body.dataset.maxThumbSize),
  };
  // the index version the header describes; answers name theirs, and a newer one refreshes the header
  let shownVersion = body.dataset.version;
  const els = {
    file: $("file-input"),
    dropzone: $("dropzone"),
    stageWrap: $("stage-wrap"),
    stage: $("stage"),
    image: $("query-image"),
    canvas: $("query-canvas"),
    caption: $("query-caption"),
    form: $("search-form"),
    bbox: $("bbox-input"),
    clearBox: $("clear-box"),
    k: $("k-input"),
    search: $("search-button"),
    error: $("error"),
    filter: $("name-filter"),
    shuffle: $("shuffle"),
    pickStatus: $("pick-status"),
    examples: $("examples"),
    status: $("status"),
    results: $("results"),
    empty: $("results-empty"),
  };

  // The current query: an uploaded File or an indexed image id, its size in original pixels, its box.
  let query = null;
  let objectUrl = null;
  let requestSerial = 0; // answers to superseded requests are dropped

  // ---------- errors and status ----------
  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }
  function clearError() {
    els.error.hidden = true;
    els.error.textContent = "";
  }
  async function apiJson(response) {
    let payload = null;
    try {
      payload = await response.json();
    } catch (_) {
      payload = null;
    }
    if (!response.ok) {
      const message = payload && payload.error ? payload.error : `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return payload;
  }

  // ---------- the index version ----------
  function formatBuilt(iso) {
    return iso ? `${iso.slice(0, 16).replace("T", " ")} UTC` : "at an unknown time";
  }
  async function noteVersion(payload) {
    if (!payload || !payload.version || payload.version === shownVersion) return;
    shownVersion = payload.version;
    try {
      const info = await apiJson(await fetch("/api/info"));
      $("index-count").firstElementChild.textContent = String(info.images);
      $("index-version").textContent = info.version;
      const built = $("index-built");
      built.textContent = formatBuilt(info.built);
      built.dateTime = info.built || "";
      built.title = `from the ${info.built_source}`;
      const stored = $("search-index");
      if (stored && info.search_index) {
        const s = info.search_index;
        stored.textContent = `${s.index}: recall@10 ${s.recall_at_10.toFixed(3)}, ` +
          `${Math.round(s.queries_per_s)} queries/s vs ${Math.round(s.exact_queries_per_s)} exact`;
      }
      shownVersion = info.version;
    } catch (_) {
      // the header stays as it was; the answers themselves are right
    }
  }
  // an indexed image's id means a row of the version that listed it: its thumbnail URL names that version
  function versionOf(item) {
    return new URL(item.thumb, window.location.href).searchParams.get("v");
  }

  // ---------- the query image and its box ----------
  function formatBox(box) {
    return box.map((v) => String(Math.round(v))).join(",");
  }
  function parseBox(text) {
    const parts = text.trim().replace(/^[[(]|[\])]$/g, "").split(/[\s,]+/).filter(Boolean).map(Number);
    return parts.length === 4 && parts.every(Number.isFinite) ? parts : null;
  }
  function scale() {
    // original pixels per displayed pixel
    return query && els.image.clientWidth ? query.width / els.image.clientWidth : 1;
  }
  // the query image fills the panel's width (small images are scaled up), at most MAX_QUERY_HEIGHT high
  const MAX_QUERY_HEIGHT = 360;
  function layoutQuery() {
    const w = els.image.naturalWidth;
    const h = els.image.naturalHeight;
    if (!w || !h) return;
    const fit = Math.min(els.stageWrap.clientWidth / w, MAX_QUERY_HEIGHT / h);
    els.image.style.width = `${Math.floor(w * fit)}px`;
    els.image.style.height = `${Math.floor(h * fit)}px`;
  }
  function drawBox(box) {
    const canvas = els.canvas;
    const w = els.image.clientWidth;
    const h = els.image.clientHeight;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    canvas.style.width = `${w}px`;
    canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!box) return;
    const s = scale();
    const [x1, y1, x2, y2] = box.map((v) => v / s);
    ctx.fillStyle = "rgba(15, 23, 42, 0.45)";
    ctx.fillRect(0, 0, w, h);
    ctx.clearRect(x1, y1, x2 - x1, y2 - y1);
    ctx.strokeStyle = "#facc15";
    ctx.lineWidth = 2;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  function describeQuery() {
    if (!query) return "";
    const name = query.kind === "upload" ? `upload ${query.name}` : `#${query.id} ${query.path}`;
    const size = query.width ? ` · ${query.width} × ${query.height}` : "";
    const box = query.bbox ? ` · box ${formatBox(query.bbox)}` : "";
    return name + size + box;
  }
  function showQuery(src) {
    els.stageWrap.hidden = false;
    els.image.src = src;
    els.caption.textContent = describeQuery();
    drawBox(null);
  }
  function setBox(box, { search = false } = {}) {
    if (!query) return;
    query.bbox = box;
    els.bbox.value = box ? formatBox(box) : "";
    els.caption.textContent = describeQuery();
    drawBox(box);
    if (search) runSearch();
  }

  function useUpload(file) {
    if (!file) return;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    query = { kind: "upload", file, name: file.name, width: 0, height: 0, bbox: null };
    els.bbox.value = "";
    showQuery(objectUrl);
    runSearch();
  }
  function useIndexed(item) {
    const v = versionOf(item);
    query = { kind: "id", id: item.id, v, path: item.path, width: item.width, height: item.height, bbox: null };
    els.bbox.value = "";
    els.file.value = ""; // the file input no longer names the query
    const params = new URLSearchParams({ size: String(config.maxThumbSize) });
    if (v) params.set("v", v);
    showQuery(`/thumb/${item.id}?${params}`);
    runSearch();
  }

  // mouse (or pen/touch) dragging on the canvas draws a box in original-image pixels
  let drag = null;
  function pointerPosition(event) {
    const rect = els.canvas.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width);
    const y = Math.min(Math.max(event.clientY - rect.top, 0), rect.height);
    return [x, y];
  }
  function dragBox(event) {
    const [x, y] = pointerPosition(event);
    const s = scale();
    const box = [Math.min(drag[0], x), Math.min(drag[1], y), Math.max(drag[0], x), Math.max(drag[1], y)].map(
      (v) => v * s,
    );
    box[2] = Math.min(box[2], query.width);
    box[3] = Math.min(box[3], query.height);
    return box;
  }
  els.canvas.addEventListener("pointerdown", (event) => {
    if (!query || !query.width) return;
    drag = pointerPosition(event);
    els.canvas.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  els.canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const box = dragBox(event);
    els.bbox.value = formatBox(box);
    drawBox(box);
  });
  els.canvas.addEventListener("pointerup", (event) => {
    if (!drag) return;
    const box = dragBox(event);
    const s = scale();
    drag = null;
    // a click (a box under 4 screen pixels) clears the box instead
    const tiny = (box[2] - box[0]) / s < 4 || (box[3] - box[1]) / s < 4;
    setBox(tiny ? null : box.map(Math.round), { search: true });
  });
  els.clearBox.addEventListener("click", () => setBox(null, { search: query !== null }));
  els.bbox.addEventListener("change", () => {
    if (!query) return;
    const text = els.bbox.value.trim();
    if (!text) return setBox(null);
    const box = parseBox(text);
    if (box) {
      query.bbox = box;
      els.caption.textContent = describeQuery();
      drawBox(box);
    }
    // a malformed box is sent as typed: the server's message says what is wrong with it
  });
  els.image.addEventListener("load", () => {
    layoutQuery();
    if (query && query.kind === "upload" && !query.width) {
      query.width = els.image.naturalWidth;
      query.height = els.image.naturalHeight;
      els.caption.textContent = describeQuery();
    }
    drawBox(query ? query.bbox : null);
  });
  window.addEventListener("resize", () => {
    layoutQuery();
    drawBox(query ? query.bbox : null);
  });

  // ---------- searching ----------
  function searchRequest(k, bboxText) {
    if (query.kind === "upload") {
      const form = new FormData();
      form.append("file", query.file, query.name);
      form.append("k", String(k));
      if (bboxText) form.append("bbox", bboxText);
      return fetch("/api/search", { method: "POST", body: form });
    }
    const params = new URLSearchParams({ id: String(query.id), k: String(k) });
    if (bboxText) params.set("bbox", bboxText);
    if (query.v) params.set("v", query.v);
    return fetch(`/api/search?${params}`);
  }

  async function runSearch() {
    if (!query) return;
    clearError();
    const serial = ++requestSerial;
    const k = els.k.value.trim() || String(config.k);
    const bboxText = els.bbox.value.trim();
    els.status.textContent = "searching…";
    els.search.disabled = true;
    body.classList.add("busy");
    try {
      const payload = await apiJson(await searchRequest(k, bboxText));
      if (serial !== requestSerial) return;
      if (query.kind === "id") {
        // the image's row in the version that answered (the server maps it when the index was updated)
        query.id = payload.query.id;
        query.v = payload.v;
      }
      noteVersion(payload);
      query.width = payload.query.width;
      query.height = payload.query.height;
      query.bbox = payload.query.bbox;
      els.caption.textContent = describeQuery();
      drawBox(query.bbox);
      els.results.classList.remove("stale");
      renderResults(payload);
    } catch (error) {
      if (serial !== requestSerial) return;
      els.status.textContent = "";
      els.results.classList.add("stale"); // still the previous query's results
      showError(error.message.startsWith("Failed to fetch") ? "cannot reach the server: is oxford-ir-serve running?" : error.message);
    } finally {
      if (serial === requestSerial) {
        els.search.disabled = false;
        body.classList.remove("busy");
      }
    }
  }

  function thumbCard(item, extra) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "card";
    button.title = `${item.path} (${item.width} × ${item.height}): search with this image`;
    const img = document.createElement("img");
    img.src = item.thumb;
    img.alt = item.path;
    img.decoding = "async";
    button.append(img);
    if (extra) button.append(extra);
    button.addEventListener("click", () => useIndexed(item));
    return button;
  }

  function renderResults(payload) {
    els.results.replaceChildren();
    els.empty.hidden = payload.results.length > 0;
    for (const result of payload.results) {
      const meta = document.createElement("div");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${result.rank}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = result.score.toFixed(3);
      const path = document.createElement("span");
      path.className = "path";
      path.textContent = result.path;
      meta.append(rank, score, path);
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.id = String(result.id);
      li.dataset.score = String(result.score);
      if (query.kind === "id" && result.id === query.id) li.classList.add("self");
      li.append(thumbCard(result, meta));
      els.results.append(li);
    }
    const n = payload.results.length;
    els.status.textContent = `${n} result${n === 1 ? "" : "s"} in ${Math.round(payload.took_ms)} ms`;
    els.results.dataset.query = query.kind === "id" ? String(query.id) : `upload:${query.name}`;
  }

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  els.k.addEventListener("change", () => runSearch());
  els.file.addEventListener("change", () => useUpload(els.file.files[0]));

  // drag and drop a file onto the upload area or the query image
  for (const target of [els.dropzone, els.stage]) {
    target.addEventListener("dragover", (event) => {
      event.preventDefault();
      els.dropzone.classList.add("over");
    });
    target.addEventListener("dragleave", () => els.dropzone.classList.remove("over"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      els.dropzone.classList.remove("over");
      const file = event.dataTransfer.files[0];
      if (file) useUpload(file);
    });
  }

  // ---------- picking an indexed image ----------
  function renderPicks(items) {
    els.examples.replaceChildren(...items.map((item) => thumbCard(item)));
  }
  async function loadExamples() {
    try {
      const payload = await apiJson(await fetch(`/api/examples?n=${config.examples}`));
      noteVersion(payload);
      renderPicks(payload.items);
      els.pickStatus.textContent = "random examples";
    } catch (error) {
      showError(error.message);
    }
  }
  let filterTimer = null;
  els.filter.addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(async () => {
      const q = els.filter.value.trim();
      if (!q) return loadExamples();
      try {
        const payload = await apiJson(await fetch(`/api/images?${new URLSearchParams({ q, limit: "24" })}`));
        noteVersion(payload);
        renderPicks(payload.items);
        els.pickStatus.textContent =
          payload.total > payload.items.length
            ? `${payload.items.length} of ${payload.total} images matching “${q}”`
            : `${payload.total} image${payload.total === 1 ? "" : "s"} matching “${q}”`;
      } catch (error) {
        showError(error.message);
      }
    }, 200);
  });
  els.shuffle.addEventListener("click", () => {
    els.filter.value = "";
    loadExamples();
  });

  loadExamples();
})();
