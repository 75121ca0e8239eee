// visae feature browser: a dependency-free single-page app over the analysis documents.
// Served: documents come from data/<key>.json. Static export (window.VISAE_STATIC): from
// data/<key>.js scripts calling visaeData(key, doc), which also works from file://.
// Each analysis has two shared documents, loaded once: a<i>/latents (table, exemplars) and
// a<i>/images (thumbnails, labels); pages refer to images by id and pack their arrays in base64.
"use strict";

(function () {
  const STATIC = Boolean(window.VISAE_STATIC);
  const cache = new Map();
  const inflight = new Map();
  const waiting = new Map();

  window.visaeData = function (key, doc) {
    cache.set(key, doc);
    const w = waiting.get(key);
    if (w) {
      waiting.delete(key);
      w(doc);
    }
  };

  function load(key) {
    if (cache.has(key)) return Promise.resolve(cache.get(key));
    if (inflight.has(key)) return inflight.get(key);
    let p;
    if (STATIC) {
      p = new Promise((resolve, reject) => {
        waiting.set(key, resolve);
        const s = document.createElement("script");
        s.src = "data/" + key + ".js";
        s.onload = () => s.remove();
        s.onerror = () => {
          waiting.delete(key);
          s.remove();
          reject(new Error("no data for " + key));
        };
        document.head.appendChild(s);
      });
    } else {
      p = fetch("data/" + key + ".json").then((r) => {
        if (!r.ok) throw new Error("no data for " + key + " (HTTP " + r.status + ")");
        return r.json();
      }).then((doc) => {
        cache.set(key, doc);
        return doc;
      });
    }
    const done = p.finally(() => inflight.delete(key));
    inflight.set(key, done);
    return done;
  }

  // the shared documents of analysis `a`, with its images as a Map id -> {thumb, source, labels}
  const sharedDocs = new Map();
  function shared(a) {
    if (!sharedDocs.has(a)) {
      const p = Promise.all([load("a" + a + "/latents"), load("a" + a + "/images")]).then(([latents, im]) => {
        const images = new Map();
        im.image.forEach((id, n) => images.set(id, {
          thumb: im.thumb[n],
          source: im.source[n],
          labels: im.labels[n].map((l) => im.label_names[l]),
        }));
        return { latents, images };
      });
      p.catch(() => sharedDocs.delete(a));
      sharedDocs.set(a, p);
    }
    return sharedDocs.get(a);
  }

  function imageInfo(sh, id) {
    const info = sh.images.get(id);
    if (!info) throw new Error("image " + id + " is not in the analysis's image list");
    return info;
  }

  // ---------- decoding of packed arrays ----------

  function b64bytes(text) {
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // a map of n patches as levels: dense (n bytes) or sparse (uint16 LE patch, uint8 level triples)
  function decodeMap(text, n) {
    const b = b64bytes(text);
    const out = new Uint8Array(n);
    if (b.length === n) return b;
    if (b.length % 3 || b.length > n) throw new Error("malformed activation map");
    for (let e = 0; e < b.length; e += 3) out[b[e] | (b[e + 1] << 8)] = b[e + 2];
    return out;
  }

  function half(u) {
    const sign = u & 0x8000 ? -1 : 1;
    const e = (u >> 10) & 0x1f;
    const f = u & 0x3ff;
    if (e === 0) return sign * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : sign * Infinity;
    return sign * (1 + f / 1024) * Math.pow(2, e - 15);
  }

  // an image page's per-patch codes as rows [patch][k] of latent ids (-1 = none) and values
  function decodeCodes(c, patches) {
    const ib = b64bytes(c.latents);
    const vb = b64bytes(c.values);
    if (ib.length !== patches * c.k * c.id_bytes || vb.length !== patches * c.k * 2) {
      throw new Error("malformed per-patch codes");
    }
    const iv = new DataView(ib.buffer);
    const vv = new DataView(vb.buffer);
    const latents = [];
    const values = [];
    for (let p = 0; p < patches; p++) {
      const lr = [];
      const vr = [];
      for (let k = 0; k < c.k; k++) {
        const i = p * c.k + k;
        lr.push(c.id_bytes === 2 ? iv.getInt16(2 * i, true) : iv.getInt32(4 * i, true));
        vr.push(half(vv.getUint16(2 * i, true)));
      }
      latents.push(lr);
      values.push(vr);
    }
    return { latents, values };
  }

  // ---------- small helpers ----------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return el;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(digits === undefined ? 2 : digits);
    return Number(v.toPrecision(digits === undefined ? 3 : digits)).toString();
  }

  function pct(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0%";
    const p = v * 100;
    return (p < 0.01 ? p.toExponential(1) : Number(p.toPrecision(3))) + "%";
  }

  function thumbUrl(a, info) {
    return "a" + a + "/" + info.thumb;
  }

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, query] = raw.split("?");
    const params = new URLSearchParams(query || "");
    return { parts: path ? path.split("/") : [], params };
  }

  function go(path, params) {
    const q = params ? new URLSearchParams(params).toString() : "";
    location.hash = "#/" + path + (q ? "?" + q : "");
  }

  function setCrumbs(...items) {
    const nav = document.getElementById("crumbs");
    nav.replaceChildren(...items.flatMap((it, i) => (i ? [" / ", it] : [it])));
  }

  // colour of a normalised activation v in [0, 1]: dark red -> red -> yellow, alpha rising with v
  function heatColor(v) {
    const t = Math.max(0, Math.min(1, v));
    const r = 255;
    const g = Math.round(255 * Math.max(0, (t - 0.35) / 0.65));
    const b = Math.round(60 * Math.max(0, (t - 0.8) / 0.2));
    const alpha = t <= 0 ? 0 : Math.round(255 * Math.min(0.9, 0.25 + 0.75 * Math.pow(t, 0.8)));
    return [t < 0.35 ? Math.round(140 + 115 * (t / 0.35)) : r, g, b, alpha];
  }

  // draw a [h, w] grid of values in [0, 1] onto a canvas, bilinearly upsampled
  function drawHeat(canvas, values, grid, opacity) {
    const [gh, gw] = grid;
    const small = document.createElement("canvas");
    small.width = gw;
    small.height = gh;
    const sctx = small.getContext("2d");
    const img = sctx.createImageData(gw, gh);
    for (let i = 0; i < gh * gw; i++) {
      const c = heatColor(values[i] || 0);
      img.data.set(c, 4 * i);
    }
    sctx.putImageData(img, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.save();
    ctx.globalAlpha = opacity;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    ctx.restore();
  }

  function heatCanvas(grid, cls) {
    const [gh, gw] = grid;
    const scale = Math.max(1, Math.round(320 / Math.max(gh, gw)));
    return h("canvas", { class: cls || "heat", width: gw * scale, height: gh * scale });
  }

  const ui = { opacity: 0.75, ranking: "max" };
  // per analysis: the latent list's sort and filters, kept across pages and in the front
  // page's URL as a<id>.<key> (only values that differ from the defaults)
  const listState = new Map();
  const LIST_URL_KEYS = { sort: "sort", desc: "desc", query: "q", show: "show", metric: "m", op: "op", min: "t" };
  const THRESHOLD_OPS = { ge: "≥", le: "≤" };

  function listDefaults() {
    return { sort: "freq_patch", desc: true, query: "", show: "all", metric: "", op: "ge", min: "", limit: 100 };
  }

  // the list state of analysis `id`: the URL's when it names any of its keys, else the last one shown
  function listStateFor(id, params) {
    const prefix = "a" + id + ".";
    const keys = Object.entries(LIST_URL_KEYS).filter(([, k]) => params.has(prefix + k));
    if (!keys.length) {
      if (!listState.has(id)) listState.set(id, listDefaults());
      return listState.get(id);
    }
    const st = listDefaults();
    for (const [field, k] of keys) {
      const v = params.get(prefix + k);
      st[field] = field === "desc" ? v === "1" : v;
    }
    listState.set(id, st);
    return st;
  }

  function writeListUrl() {
    if (parseHash().parts.length) return; // left the front page meanwhile
    const def = listDefaults();
    const q = new URLSearchParams();
    for (const id of [...listState.keys()].sort((x, y) => x - y)) {
      const st = listState.get(id);
      for (const [field, k] of Object.entries(LIST_URL_KEYS)) {
        if (st[field] === def[field]) continue;
        q.set("a" + id + "." + k, field === "desc" ? (st.desc ? "1" : "0") : st[field]);
      }
    }
    const text = q.toString();
    history.replaceState(null, "", "#/" + (text ? "?" + text : ""));
  }

  // ---------- pages ----------

  async function renderHome(app, params) {
    setCrumbs(h("span", {}, "latents"));
    const index = await load("index");
    const cols = h("div", { class: "columns" });
    app.replaceChildren(cols);
    const docs = await Promise.all(index.analyses.map((a) => load("a" + a.id + "/latents")));
    index.analyses.forEach((a, i) => cols.appendChild(latentListPanel(a, docs[i], listStateFor(a.id, params))));
    writeListUrl();
  }

  // a document's value for a column name (names are user-chosen: "constructor" is one too)
  function own(obj, key) {
    return Object.hasOwn(obj, key) ? obj[key] : undefined;
  }

  function undefinedValue(v) {
    return v === null || v === undefined || v === "" || Number.isNaN(v);
  }

  function sourcesLine(sources, names) {
    const from = [...new Set(names.map((n) => own(sources, n)).filter(Boolean))];
    return from.length ? h("div", { class: "meta sources" }, "scores from " + from.join(", ")) : null;
  }

  function latentListPanel(a, doc, st) {
    const c = doc.columns;
    const metrics = doc.metrics || {};
    const texts = doc.texts || {};
    const sources = a.sources || {};
    // kind: "num" (sorted as numbers, descending first) or "text" (alphabetically, ascending first)
    const fields = [
      { name: "latent", title: "latent", kind: "num", f: (v) => String(v) },
      { name: "freq_patch", title: "freq (patch)", kind: "num", f: pct },
      { name: "freq_image", title: "freq (image)", kind: "num", f: pct },
      { name: "max_patch", title: "max", kind: "num", f: (v) => fmt(v) },
      { name: "mean_active", title: "mean active", kind: "num", f: (v) => fmt(v) },
    ];
    if (a.rankings.includes("cls")) fields.push({ name: "freq_cls", title: "freq (CLS)", kind: "num", f: pct });
    for (const m of Object.keys(metrics)) fields.push({ name: m, title: m, kind: "num", f: (v) => fmt(v) });
    for (const t of Object.keys(texts)) fields.push({ name: t, title: t, kind: "text", f: (v) => v || "–" });
    if (a.has_labels) fields.push({ name: "top_label", title: "top label", kind: "text", f: null });
    const textFields = fields.filter((f) => f.kind === "text").map((f) => f.name);
    const value = (name, j) => (Object.hasOwn(c, name) ? c : Object.hasOwn(metrics, name) ? metrics : texts)[name][j];
    if (!fields.some((f) => f.name === st.sort)) Object.assign(st, { sort: "freq_patch", desc: true });
    if (!Object.hasOwn(metrics, st.metric)) st.metric = "";
    if (!Object.hasOwn(THRESHOLD_OPS, st.op)) st.op = "ge";
    if (!["all", "live", "dead"].includes(st.show)) st.show = "all";

    const panel = h("section", { class: "panel latent-list", dataset: { analysis: a.id } });
    const tbody = h("tbody");
    const head = h("tr");
    const count = h("span", { class: "muted count" });
    const more = h("button", { class: "more" }, "show more");

    function threshold() {
      const t = st.min.trim() === "" ? NaN : Number(st.min);
      return st.metric && Number.isFinite(t) ? t : null;
    }

    function rows() {
      const q = st.query.trim().toLowerCase();
      let ids = c.latent.slice();
      if (st.show === "live") ids = ids.filter((j) => !c.dead[j]);
      if (st.show === "dead") ids = ids.filter((j) => c.dead[j]);
      if (q) {
        ids = /^\d+$/.test(q)
          ? ids.filter((j) => String(j).startsWith(q))
          : ids.filter((j) => textFields.some((name) => (value(name, j) || "").toLowerCase().includes(q)));
      }
      const t = threshold();
      if (t !== null) {
        const col = metrics[st.metric];
        ids = ids.filter((j) => !undefinedValue(col[j]) && (st.op === "ge" ? col[j] >= t : col[j] <= t));
      }
      const sign = st.desc ? -1 : 1;
      const text = fields.find((f) => f.name === st.sort).kind === "text";
      ids.sort((x, y) => {
        const vx = value(st.sort, x);
        const vy = value(st.sort, y);
        const ux = undefinedValue(vx), uy = undefinedValue(vy);
        if (ux || uy) return ux && uy ? x - y : ux ? 1 : -1;
        const d = text ? String(vx).localeCompare(String(vy)) : vx - vy;
        return d ? Math.sign(d) * sign : x - y;
      });
      return ids;
    }

    function draw() {
      head.replaceChildren(...fields.map(({ name, title, kind }) => h("th", {
        class: (name === st.sort ? "sorted " : "") + (name === "top_label" ? "label" : kind === "text" ? "text" : ""),
        dataset: { column: name },
        title: "sort by " + title + (own(sources, name) ? " (from " + own(sources, name) + ")" : ""),
        onclick: () => {
          if (st.sort === name) st.desc = !st.desc;
          else { st.sort = name; st.desc = kind === "num" && name !== "latent"; }
          update();
        },
      }, title + (name === st.sort ? (st.desc ? " ▾" : " ▴") : ""))));
      const ids = rows();
      count.textContent = ids.length + " of " + c.latent.length + " latents";
      tbody.replaceChildren(...ids.slice(0, st.limit).map((j) => {
        const dead = Boolean(c.dead[j]);
        return h("tr", {
          class: dead ? "dead" : "",
          dataset: { latent: j },
          onclick: () => go("latent/" + a.id + "/" + j),
        }, fields.map(({ name, kind, f }) => {
          const v = value(name, j);
          if (name === "latent") return h("td", {}, String(j), dead ? h("span", { class: "badge dead" }, "dead") : null);
          if (name === "top_label") {
            const frac = c.top_label_frac[j];
            return h("td", { class: "label" }, v || "", v && frac !== null ? h("span", { class: "muted" }, " (" + Math.round(frac * 100) + "%)") : null);
          }
          if (kind === "text") return h("td", { class: "text", title: v || null, dataset: { column: name } }, f(v));
          return h("td", { dataset: { column: name } }, f(v));
        }));
      }));
      more.style.display = ids.length > st.limit ? "" : "none";
      thresholdInput.classList.toggle("invalid", st.min.trim() !== "" && !Number.isFinite(Number(st.min)));
    }

    function update() {
      draw();
      writeListUrl();
    }
    more.onclick = () => { st.limit += 200; draw(); };

    const searchable = ["latent id"].concat(textFields.map((n) => (n === "top_label" ? "label" : n)));
    const search = h("input", { type: "search", class: "text-filter", placeholder: searchable.join(", "), value: st.query });
    search.addEventListener("input", () => { st.query = search.value; st.limit = 100; update(); });
    const show = h("select", { title: "which latents", class: "show" },
      ["all", "live", "dead"].map((v) => h("option", { value: v, selected: v === st.show }, v)));
    show.addEventListener("change", () => { st.show = show.value; update(); });

    const metricSelect = h("select", { class: "threshold-metric", title: "keep latents whose metric passes a threshold" },
      h("option", { value: "" }, "any score"),
      Object.keys(metrics).map((m) => h("option", { value: m, selected: m === st.metric }, m)));
    const opSelect = h("select", { class: "threshold-op", title: "at least / at most" },
      Object.entries(THRESHOLD_OPS).map(([v, sym]) => h("option", { value: v, selected: v === st.op }, sym)));
    const thresholdInput = h("input", { type: "text", inputmode: "decimal", class: "threshold-value", placeholder: "threshold", value: st.min, size: 8 });
    metricSelect.addEventListener("change", () => { st.metric = metricSelect.value; st.limit = 100; update(); });
    opSelect.addEventListener("change", () => { st.op = opSelect.value; update(); });
    thresholdInput.addEventListener("input", () => { st.min = thresholdInput.value; st.limit = 100; update(); });

    panel.append(...[
      h("h2", {}, a.name),
      h("div", { class: "meta" },
        [a.backbone, "layer " + a.layer, a.sae.arch + (a.sae.k ? " k=" + a.sae.k : ""),
          a.sae.n_latents + " latents", a.n_images + " images"].join(" · "),
        " · ", h("span", { class: a.n_dead ? "badge dead" : "badge" }, a.n_dead + " dead"),
        " · ", h("a", { href: "#/images/" + a.id }, "browse images")),
      sourcesLine(sources, Object.keys(metrics).concat(Object.keys(texts))),
      h("img", { class: "freqplot", src: "a" + a.id + "/" + a.frequency_plot, alt: "latent frequency histogram" }),
      h("div", { class: "controls" }, search, show, count),
      Object.keys(metrics).length ? h("div", { class: "controls threshold" }, metricSelect, opSelect, thresholdInput) : null,
      h("div", { class: "table-wrap" }, h("table", { class: "latents" }, h("thead", {}, head), tbody)),
      more,
    ].filter(Boolean));
    draw();
    return panel;
  }

  async function renderLatent(app, a, j, params) {
    const index = await load("index");
    const meta = index.analyses[a];
    if (!meta) throw new Error("no analysis " + a);
    const [sh, doc] = await Promise.all([shared(a), load("a" + a + "/latent/" + j)]);
    const ranking = params.get("r") || (meta.rankings.includes(ui.ranking) ? ui.ranking : "max");
    setCrumbs(h("a", { href: "#/" }, "latents"), h("span", {}, meta.name), h("span", {}, "latent " + j));
    const s = {};
    for (const [name, col] of Object.entries(sh.latents.columns)) s[name] = col[j];
    const metrics = sh.latents.metrics || {};
    const texts = sh.latents.texts || {};
    const sources = meta.sources || {};
    const stat = (label, v) => h("div", {}, h("span", {}, label), v);
    const score = (name, v) => h("div", { dataset: { column: name }, title: own(sources, name) ? "from " + own(sources, name) : null },
      h("span", {}, name), h("div", { class: "value" }, v));
    const scoreNames = Object.keys(metrics).concat(Object.keys(texts));
    const stats = h("div", { class: "stats" },
      stat("frequency (patches)", pct(s.freq_patch)),
      stat("frequency (images)", pct(s.freq_image)),
      meta.rankings.includes("cls") ? stat("frequency (CLS)", pct(s.freq_cls)) : null,
      stat("max activation", fmt(s.max_patch)),
      stat("mean when active", fmt(s.mean_active)),
      stat("mean (all patches)", fmt(s.mean_patch)),
      meta.has_labels ? stat("top label (share of top images vs all)", s.top_label
        ? s.top_label + " (" + Math.round(100 * s.top_label_frac) + "% vs " + Math.round(100 * s.top_label_base) + "%)" : "–") : null,
    );
    const scores = scoreNames.length ? [
      h("h3", {}, "Scores"),
      sourcesLine(sources, scoreNames),
      h("div", { class: "stats scores" },
        Object.keys(metrics).map((m) => score(m, fmt(metrics[m][j]))),
        Object.keys(texts).map((t) => score(t, texts[t][j] || "–"))),
    ] : [];
    const tabs = h("div", { class: "tabs" }, meta.rankings.map((r) => h("button", {
      class: r === ranking ? "active" : "",
      dataset: { ranking: r },
      onclick: () => { ui.ranking = r; go("latent/" + a + "/" + j, { r }); },
    }, { max: "max over patches", mean: "mean over patches", cls: "CLS token" }[r] || r)));
    const opacity = h("input", { type: "range", min: 0, max: 1, step: 0.05, value: ui.opacity, class: "opacity" });
    const cards = h("div", { class: "cards" });
    const top = doc.rankings[ranking] || { images: [], values: [] };
    const patches = meta.grid[0] * meta.grid[1];
    const entries = top.images.map((image, n) => ({
      image,
      value: top.values[n],
      info: imageInfo(sh, image),
      map: Array.from(decodeMap(doc.maps[String(image)], patches), (q) => q / doc.levels),
    }));

    function drawCards() {
      cards.replaceChildren(...entries.map((e) => {
        const info = e.info;
        const canvas = heatCanvas(meta.grid);
        drawHeat(canvas, e.map, meta.grid, ui.opacity);
        return h("div", {
          class: "card",
          dataset: { image: e.image },
          title: info.source,
          onclick: () => go("image/" + a + "/" + e.image, { l: j }),
        },
        h("div", { class: "thumbwrap" }, h("img", { src: thumbUrl(a, info), alt: "image " + e.image, loading: "lazy" }), canvas),
        h("div", { class: "caption" }, "image " + e.image + " · " + fmt(e.value),
          info.labels && info.labels.length ? h("div", { class: "labels", title: info.labels.join(", ") }, info.labels.join(", ")) : null));
      }));
    }
    opacity.addEventListener("input", () => { ui.opacity = Number(opacity.value); drawCards(); });

    const hist = h("canvas", { class: "hist", width: 520, height: 140 });
    const nav = h("div", { class: "controls" },
      j > 0 ? h("a", { href: "#/latent/" + a + "/" + (j - 1) }, "← latent " + (j - 1)) : null,
      j + 1 < meta.sae.n_latents ? h("a", { href: "#/latent/" + a + "/" + (j + 1) }, "latent " + (j + 1) + " →") : null);
    app.replaceChildren(h("section", { class: "panel latent-page", dataset: { analysis: a, latent: j } },
      h("h2", {}, "Latent " + j, s.dead ? h("span", { class: "badge dead" }, "dead") : null),
      h("div", { class: "meta" }, meta.name), nav, stats, ...scores,
      h("h3", {}, "Top images"),
      h("div", { class: "controls" }, tabs, h("label", { class: "slider" }, "overlay", opacity)),
      entries.length ? cards : h("p", { class: "muted" }, "This latent never fires under this ranking."),
      h("h3", {}, "Activation histogram (patches where it fires)"),
      doc.hist.counts.length ? hist : h("p", { class: "muted" }, "No activations.")));
    drawCards();
    if (doc.hist.counts.length) drawHist(hist, doc.hist);
  }

  function drawHist(canvas, hist) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, pad = 18;
    const n = hist.counts.length;
    const top = Math.max(...hist.counts);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#3b6ea8";
    const bw = (W - 2 * pad) / n;
    hist.counts.forEach((cnt, i) => {
      const bh = (H - 2 * pad) * (cnt / top);
      ctx.fillRect(pad + i * bw, H - pad - bh, Math.max(1, bw - 1), bh);
    });
    ctx.fillStyle = "#6b7280";
    ctx.font = "11px sans-serif";
    ctx.fillText(fmt(hist.edges[0]), pad, H - 4);
    const last = fmt(hist.edges[hist.edges.length - 1]);
    ctx.fillText(last, W - pad - ctx.measureText(last).width, H - 4);
    ctx.fillText("max count " + top + " (log-spaced bins)", pad, 12);
  }

  async function renderImage(app, a, img, params) {
    const index = await load("index");
    const meta = index.analyses[a];
    if (!meta) throw new Error("no analysis " + a);
    // the other analyses of the same images that hold this image's codes: side by side
    const ids = [a].concat(index.analyses
      .filter((o) => o.id !== a && o.fingerprint && o.fingerprint === meta.fingerprint && o.code_images.includes(img))
      .map((o) => o.id));
    const [docs, shs] = await Promise.all([
      Promise.all(ids.map((i) => load("a" + i + "/image/" + img))),
      Promise.all(ids.map((i) => shared(i))),
    ]);
    setCrumbs(h("a", { href: "#/" }, "latents"), h("a", { href: "#/images/" + a }, "images"), h("span", {}, "image " + img));
    const x = params.has("x") ? Number(params.get("x")) : null;
    const y = params.has("y") ? Number(params.get("y")) : null;
    const maxK = Math.max(...docs.map((d) => (d.codes ? d.codes.k : 1)));
    const n = Math.min(maxK, Number(params.get("n") || Math.min(5, maxK)));
    const focus = params.get("l");

    const slider = h("input", { type: "range", id: "count-slider", min: 1, max: maxK, step: 1, value: n });
    const sliderLabel = h("span", { class: "count-label" }, String(n));
    slider.addEventListener("input", () => {
      sliderLabel.textContent = slider.value;
      panels.forEach((p) => p.list(Number(slider.value)));
    });
    slider.addEventListener("change", () => {
      const p = Object.fromEntries(params);
      p.n = slider.value;
      history.replaceState(null, "", "#/image/" + a + "/" + img + "?" + new URLSearchParams(p));
    });
    // the edit panel: served with a live model that can edit this analysis (never static)
    const live = !STATIC && index.live && Object.hasOwn(index.live.analyses, String(a)) ? index.live : null;
    const editor = live ? editPanel(live, meta, docs[0], shs[0]) : null;
    const panels = ids.map((i, k) => imagePanel(index.analyses[i], docs[k], shs[k], x, y, n, i === a ? focus : null, (nx, ny) => {
      const p = Object.fromEntries(params);
      p.x = nx.toFixed(4);
      p.y = ny.toFixed(4);
      p.n = slider.value;
      go("image/" + a + "/" + img, p);
    }, i === a && editor ? editor.add : null));
    app.replaceChildren(
      h("div", { class: "controls" }, h("h2", {}, "Image " + img),
        h("label", { class: "slider" }, "latents per patch", slider, sliderLabel),
        x === null ? h("span", { class: "muted" }, "click a patch to list the latents that fire there") : null),
      h("div", { class: "columns" }, panels.map((p) => p.el)),
      editor ? editor.el : null);
    if (editor) editor.send();
  }

  // ---------- edit panel (served with a live model) ----------

  // per analysis/image: the edit being built, kept while the page re-renders (a patch click)
  const editStates = new Map();
  // the slider's span (set: multiples of the max; scale: factors); typed values go to the limit
  const VALUE_RANGE = [-2, 4];
  // colours of segmentation classes (class 0, background, is left clear)
  const CLASS_COLORS = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]];

  function editState(a, img) {
    const key = a + "/" + img;
    if (!editStates.has(key)) editStates.set(key, { latents: [], op: "set", value: 0, patches: new Set(), last: null });
    return editStates.get(key);
  }

  function classColor(c) {
    return CLASS_COLORS[(c - 1 + CLASS_COLORS.length) % CLASS_COLORS.length];
  }

  // the panel of analysis `meta` on image `doc.image`: latents, operation, value, region brush,
  // and the head's output before and after, recomputed by the server on every change
  function editPanel(live, meta, doc, sh) {
    const a = meta.id;
    const img = doc.image;
    const [gh, gw] = doc.grid;
    const nLatents = meta.sae.n_latents;
    const st = editState(a, img);
    const info = imageInfo(sh, img);
    const head = live.head;
    const el = h("section", { class: "panel edit-panel", dataset: { analysis: a, state: "idle", requests: 0 } });

    const chips = h("div", { class: "edit-latents" });
    const latentInput = h("input", { type: "text", class: "edit-latent-input", placeholder: "latent ids, e.g. 12, 40", size: 18 });
    const addButton = h("button", { class: "edit-latent-add" }, "add");
    const inputError = h("span", { class: "error edit-input-error" });
    const op = h("select", { class: "edit-op", title: "set: the latent's code becomes value × its max activation; scale: its code times value; ablate: 0" },
      live.ops.map((o) => h("option", { value: o, selected: o === st.op }, o)));
    const value = h("input", { type: "range", class: "edit-value", step: 0.05 });
    const valueText = h("input", { type: "number", class: "edit-value-text", step: 0.05, min: -live.value_limit, max: live.value_limit });
    const valueUnit = h("span", { class: "muted edit-unit" });
    const brush = heatCanvas(doc.grid, "brush");
    const regionText = h("span", { class: "muted edit-region" });
    const clear = h("button", { class: "edit-clear" }, "every token");
    const status = h("div", { class: "meta edit-status" });
    const before = h("div", { class: "edit-before" });
    const after = h("div", { class: "edit-after" });

    function drawChips() {
      chips.replaceChildren(...(st.latents.length ? st.latents.map((j) => h("span", { class: "chip", dataset: { latent: j } },
        h("a", { href: "#/latent/" + a + "/" + j }, "latent " + j),
        h("button", { class: "chip-remove", title: "remove", onclick: () => { st.latents = st.latents.filter((x) => x !== j); drawChips(); send(); } }, "×")))
        : [h("span", { class: "muted" }, "no latent: pick one with “edit” in the patch list, or type ids")]));
    }

    function drawValue() {
      [value.min, value.max] = VALUE_RANGE;
      value.value = st.value;
      valueText.value = st.value;
      value.disabled = valueText.disabled = st.op === "ablate";
      valueUnit.textContent = st.op === "set" ? "× max activation (0 = ablate)" : st.op === "scale" ? "× its code (1 = unchanged)" : "code set to 0";
    }

    function drawBrush() {
      const ctx = brush.getContext("2d");
      const cw = brush.width / gw, ch = brush.height / gh;
      ctx.clearRect(0, 0, brush.width, brush.height);
      ctx.fillStyle = "rgba(0, 229, 255, 0.45)";
      for (const p of st.patches) ctx.fillRect((p % gw) * cw, Math.floor(p / gw) * ch, cw, ch);
      ctx.strokeStyle = "rgba(255,255,255,0.25)";
      ctx.lineWidth = 1;
      for (let c = 1; c < gw; c++) { ctx.beginPath(); ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, brush.height); ctx.stroke(); }
      for (let r = 1; r < gh; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch); ctx.lineTo(brush.width, r * ch); ctx.stroke(); }
      regionText.textContent = st.patches.size ? st.patches.size + " of " + gw * gh + " patches" : "every token";
      el.dataset.patches = [...st.patches].sort((x, y) => x - y).join(",");
    }

    function add(j) {
      if (st.latents.includes(j)) return;
      if (st.latents.length >= live.max_latents) {
        inputError.textContent = "at most " + live.max_latents + " latents";
        return;
      }
      inputError.textContent = "";
      st.latents.push(j);
      drawChips();
      send();
    }

    function addTyped() {
      const items = latentInput.value.split(/[\s,]+/).filter(Boolean);
      const bad = items.find((t) => !/^\d+$/.test(t) || Number(t) >= nLatents);
      if (bad !== undefined) {
        inputError.textContent = "not a latent id (0.." + (nLatents - 1) + "): " + bad;
        return;
      }
      inputError.textContent = "";
      latentInput.value = "";
      items.forEach((t) => { if (!st.latents.includes(Number(t))) st.latents.push(Number(t)); });
      drawChips();
      send();
    }
    addButton.addEventListener("click", addTyped);
    latentInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") addTyped(); });
    op.addEventListener("change", () => {
      st.op = op.value;
      if (st.op === "scale" && st.value === 0) st.value = 1;
      drawValue();
      send();
    });
    value.addEventListener("input", () => { st.value = Number(value.value); valueText.value = value.value; send(); });
    valueText.addEventListener("input", () => {
      const v = Number(valueText.value);
      if (valueText.value.trim() === "" || !Number.isFinite(v) || Math.abs(v) > live.value_limit) {
        valueText.classList.add("invalid");
        return;
      }
      valueText.classList.remove("invalid");
      st.value = v;
      value.value = v;
      send();
    });

    // the brush: press on a patch to add it (or remove it, when it is in), drag to paint more
    let painting = null;
    function patchAt(ev) {
      const r = brush.getBoundingClientRect();
      const px = Math.min(gw - 1, Math.max(0, Math.floor(((ev.clientX - r.left) / r.width) * gw)));
      const py = Math.min(gh - 1, Math.max(0, Math.floor(((ev.clientY - r.top) / r.height) * gh)));
      return py * gw + px;
    }
    function paint(p) {
      if (painting === "add") st.patches.add(p);
      else st.patches.delete(p);
      drawBrush();
    }
    brush.addEventListener("pointerdown", (ev) => {
      const p = patchAt(ev);
      painting = st.patches.has(p) ? "remove" : "add";
      brush.setPointerCapture(ev.pointerId);
      paint(p);
    });
    brush.addEventListener("pointermove", (ev) => { if (painting) paint(patchAt(ev)); });
    const stop = () => { if (painting) { painting = null; send(); } };
    brush.addEventListener("pointerup", stop);
    brush.addEventListener("pointercancel", stop);
    clear.addEventListener("click", () => { st.patches.clear(); drawBrush(); send(); });

    function classTable(rows, other) {
      const was = new Map((other || []).map((c) => [c.index, c.prob]));
      return h("table", { class: "edit-classes" }, h("tbody", {}, rows.map((c) => h("tr", { class: "edit-class", dataset: { index: c.index, prob: c.prob, score: c.score } },
        h("td", { class: "name", title: c.name }, c.name),
        h("td", { class: "bar" }, h("span", { style: "width:" + Math.max(0, Math.min(100, 100 * c.prob)).toFixed(1) + "%" })),
        h("td", { class: "prob" }, pct(c.prob), other && was.has(c.index) && was.get(c.index) !== c.prob
          ? h("span", { class: "muted" }, " (" + pct(was.get(c.index)) + ")") : null)))));
    }

    function denseBox(out, which) {
      const [mh, mw] = out.shape;
      const b = b64bytes(out[which]);
      const canvas = h("canvas", { class: "dense", width: mw, height: mh });
      const ctx = canvas.getContext("2d");
      const im = ctx.createImageData(mw, mh);
      if (out.map === "probability") {
        for (let i = 0; i < mh * mw; i++) im.data.set(heatColor(b[i] / out.levels), 4 * i);
      } else {
        const view = new DataView(b.buffer);
        const wide = out.dtype === "<u2";
        for (let i = 0; i < mh * mw; i++) {
          const c = wide ? view.getUint16(2 * i, true) : b[i];
          if (c > 0) im.data.set([...classColor(c), 150], 4 * i);
        }
      }
      ctx.putImageData(im, 0, 0);
      return h("div", { class: "imagebox", dataset: { map: which } }, h("img", { src: thumbUrl(a, info), alt: "image " + img }), canvas);
    }

    function classLegend(out) {
      const seen = new Set();
      for (const which of ["before", "after"]) {
        const b = b64bytes(out[which]);
        const view = new DataView(b.buffer);
        for (let i = 0; i < out.shape[0] * out.shape[1]; i++) seen.add(out.dtype === "<u2" ? view.getUint16(2 * i, true) : b[i]);
      }
      return h("div", { class: "legend" }, [...seen].sort((x, y) => x - y).map((c) => h("span", { class: "legend-item" },
        h("span", { class: "swatch", style: c ? "background:rgb(" + classColor(c).join(",") + ")" : "" }), out.labels[c])));
    }

    function show(res) {
      const out = res.output;
      if (out.kind === "classification") {
        before.replaceChildren(h("h3", {}, "before"), classTable(out.before, null));
        after.replaceChildren(h("h3", {}, "after" + (res.edit ? "" : " (no edit)")), classTable(out.after, out.before),
          res.edit ? h("div", { class: "meta moved" }, "most moved: " + out.moved.map((c) => c.name + " " + fmt(c.before) + " → " + fmt(c.after)).join(", ")) : null);
      } else {
        const note = out.map === "probability"
          ? "mean " + fmt(out.mean_before) + " → " + fmt(out.mean_after) + ", largest change " + fmt(out.max_change)
          : pct(out.changed) + " of cells change class";
        before.replaceChildren(h("h3", {}, "before"), denseBox(out, "before"), out.map === "classes" ? classLegend(out) : null);
        after.replaceChildren(h("h3", {}, "after" + (res.edit ? "" : " (no edit)")), denseBox(out, "after"), h("div", { class: "meta" }, note));
      }
      status.replaceChildren(res.label + " at layer " + res.layer + " · " + Math.round(res.seconds * 1000) + " ms on the server");
    }

    // one request in flight; changes meanwhile send the latest state once it returns
    let inflight = false;
    let pending = false;
    // the page re-renders on a patch click: the last answer is shown again, not recomputed
    function send() {
      if (inflight) { pending = true; return; }
      const body = JSON.stringify({ image: img, latents: st.latents, op: st.op, value: st.value, patches: [...st.patches].sort((x, y) => x - y) });
      if (st.last && st.last.body === body) {
        show(st.last.doc);
        el.dataset.requests = Number(el.dataset.requests) + 1;
        return;
      }
      inflight = true;
      pending = false;
      el.dataset.state = "busy";
      fetch("api/a" + a + "/intervene", { method: "POST", headers: { "Content-Type": "application/json" }, body })
        .then((r) => r.json().then((doc) => {
          if (!r.ok) throw new Error(doc.error || "HTTP " + r.status);
          return doc;
        }))
        .then((doc) => {
          st.last = { body, doc };
          show(doc);
          el.dataset.error = "";
          status.classList.remove("error");
        })
        .catch((err) => {
          el.dataset.error = String(err.message || err);
          status.replaceChildren(String(err.message || err));
          status.classList.add("error");
        })
        .finally(() => {
          inflight = false;
          el.dataset.requests = Number(el.dataset.requests) + 1;
          if (pending) send();
          else el.dataset.state = "idle";
        });
    }

    el.append(
      h("h2", {}, "Edit latents"),
      h("div", { class: "meta" }, live.model + " · head " + head.name + " (" + head.kind + ") · layer " + live.analyses[String(a)].layer),
      h("div", { class: "edit-grid" },
        h("div", { class: "edit-controls" },
          h("h3", {}, "Latents"), chips,
          h("div", { class: "controls" }, latentInput, addButton, inputError),
          h("h3", {}, "Operation"),
          h("div", { class: "controls" }, op, value, valueText, valueUnit),
          h("h3", {}, "Region"),
          h("div", { class: "meta" }, "click or drag over patches; none chosen: every token"),
          h("div", { class: "imagebox brushbox" }, h("img", { src: thumbUrl(a, info), alt: "image " + img }), brush),
          h("div", { class: "controls" }, regionText, clear)),
        h("div", { class: "edit-output" }, status, h("div", { class: "edit-compare" }, before, after))));
    drawChips();
    drawValue();
    drawBrush();
    return { el, add, send };
  }

  function imagePanel(meta, doc, sh, x, y, n, focus, onPick, onEdit) {
    const [gh, gw] = doc.grid;
    const info = imageInfo(sh, doc.image);
    const codes = doc.codes ? decodeCodes(doc.codes, gh * gw) : null;
    const cols = sh.latents.columns;
    const a = meta.id;
    const canvas = heatCanvas(doc.grid, "overlay");
    const list = h("div", { class: "patch-list" });
    const el = h("section", { class: "panel image-panel", dataset: { analysis: a } },
      h("h3", {}, meta.name),
      h("div", { class: "meta" }, (info.labels && info.labels.length ? info.labels.join(", ") + " · " : "") + info.source),
      h("div", { class: "imagebox" }, h("img", { src: thumbUrl(a, info), alt: "image " + doc.image }), canvas),
      list);
    const patch = x === null || y === null ? null
      : Math.min(gh - 1, Math.floor(y * gh)) * gw + Math.min(gw - 1, Math.floor(x * gw));
    let selected = focus === null || focus === undefined ? null : Number(focus);

    function mapOf(latent) {
      const vals = new Array(gh * gw).fill(0);
      if (!codes || latent === null) return vals;
      const scale = cols.max_patch[latent] || 1;
      codes.latents.forEach((row, p) => {
        const k = row.indexOf(latent);
        if (k >= 0) vals[p] = codes.values[p][k] / scale;
      });
      return vals;
    }

    function drawOverlay() {
      drawHeat(canvas, mapOf(selected), doc.grid, 0.75);
      const ctx = canvas.getContext("2d");
      const cw = canvas.width / gw, ch = canvas.height / gh;
      ctx.strokeStyle = "rgba(255,255,255,0.18)";
      ctx.lineWidth = 1;
      for (let c = 1; c < gw; c++) { ctx.beginPath(); ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, canvas.height); ctx.stroke(); }
      for (let r = 1; r < gh; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch); ctx.lineTo(canvas.width, r * ch); ctx.stroke(); }
      if (patch !== null) {
        ctx.strokeStyle = "#00e5ff";
        ctx.lineWidth = 3;
        ctx.strokeRect((patch % gw) * cw + 1.5, Math.floor(patch / gw) * ch + 1.5, cw - 3, ch - 3);
      }
    }

    canvas.addEventListener("click", (ev) => {
      const r = canvas.getBoundingClientRect();
      const px = Math.min(gw - 1, Math.floor(((ev.clientX - r.left) / r.width) * gw));
      const py = Math.min(gh - 1, Math.floor(((ev.clientY - r.top) / r.height) * gh));
      onPick((px + 0.5) / gw, (py + 0.5) / gh);
    });

    function latentRow(j, v) {
      const label = cols.top_label[j];
      const row = h("div", {
        class: "patch-latent" + (j === selected ? " selected" : ""),
        dataset: { latent: j, value: v },
        onclick: () => { selected = selected === j ? null : j; drawOverlay(); renderList(current); },
      },
      h("div", {},
        h("a", { href: "#/latent/" + a + "/" + j, onclick: (ev) => ev.stopPropagation() }, "latent " + j),
        onEdit ? h("button", { class: "edit-add", title: "add latent " + j + " to the edit", onclick: (ev) => { ev.stopPropagation(); onEdit(j); } }, "edit") : null,
        h("div", {}, "activation " + fmt(v)),
        h("div", { class: "muted" }, "freq " + pct(cols.freq_patch[j]) + (label ? " · " + label : ""))),
      h("div", { class: "exemplars" }, sh.latents.exemplars[j].map((e) => h("a", {
        href: "#/image/" + a + "/" + e + "?l=" + j,
        onclick: (ev) => ev.stopPropagation(),
      }, h("img", {
        src: thumbUrl(a, imageInfo(sh, e)),
        title: "image " + e,
        alt: "image " + e,
        loading: "lazy",
      })))));
      return row;
    }

    let current = n;
    function renderList(count) {
      current = count;
      if (!codes) {
        list.replaceChildren(h("p", { class: "muted" }, "No per-patch codes stored for this image."));
        return;
      }
      if (patch === null) {
        const items = doc.cls ? doc.cls.latents.slice(0, count).map((j, k) => latentRow(j, doc.cls.values[k])) : [];
        list.replaceChildren(...[
          h("p", { class: "muted" }, "Click a patch of the image."),
          items.length ? h("h3", {}, "Strongest CLS-token latents") : null, ...items].filter(Boolean));
        return;
      }
      const lats = codes.latents[patch];
      const vals = codes.values[patch];
      const items = [];
      for (let k = 0; k < Math.min(count, lats.length); k++) {
        if (lats[k] < 0) break;
        items.push(latentRow(lats[k], vals[k]));
      }
      list.replaceChildren(...[
        h("h3", { class: "patch-title", dataset: { patch } }, "Patch (" + Math.floor(patch / gw) + ", " + (patch % gw) + ")"),
        items.length ? null : h("p", { class: "muted" }, "No latent fires on this patch."),
        ...items].filter(Boolean));
    }

    drawOverlay();
    renderList(n);
    return { el, list: renderList };
  }

  async function renderImages(app, a) {
    const index = await load("index");
    const meta = index.analyses[a];
    if (!meta) throw new Error("no analysis " + a);
    setCrumbs(h("a", { href: "#/" }, "latents"), h("span", {}, meta.name), h("span", {}, "images"));
    app.replaceChildren(h("section", { class: "panel" },
      h("h2", {}, "Sample images"),
      h("div", { class: "meta" }, meta.sample.length + " images picked at random; every top image of a latent is reachable from its latent page"),
      h("div", { class: "gallery" }, meta.sample.map((s) => h("a", { href: "#/image/" + a + "/" + s.image, dataset: { image: s.image } },
        h("img", { src: thumbUrl(a, s), alt: "image " + s.image, loading: "lazy" }))))));
  }

  let lastPath = null;

  async function render() {
    const app = document.getElementById("app");
    const { parts, params } = parseHash();
    try {
      if (parts[0] === "latent" && parts.length === 3) await renderLatent(app, Number(parts[1]), Number(parts[2]), params);
      else if (parts[0] === "image" && parts.length === 3) await renderImage(app, Number(parts[1]), Number(parts[2]), params);
      else if (parts[0] === "images" && parts.length === 2) await renderImages(app, Number(parts[1]));
      else await renderHome(app, params);
      const path = parts.join("/");
      if (path !== lastPath) window.scrollTo(0, 0);
      lastPath = path;
    } catch (err) {
      app.replaceChildren(h("p", { class: "error" }, String(err.message || err)));
    }
    document.body.dataset.ready = location.hash || "#/";
  }

  window.addEventListener("hashchange", render);
  render();
})();
