// The participant's page: one view per stage, drawn from the server's state, so a refresh or
// a reconnect shows exactly where the participant is.
"use strict";
const token = location.pathname.split("/")[2];
const app = document.getElementById("app");
const errorBox = document.getElementById("error");

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== false && v !== undefined) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(c));
  return el;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(`/api/s/${token}/${path}`, init);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || `request failed (${r.status})`);
  return data;
}

async function run(action) {
  errorBox.textContent = "";
  try { await action(); } catch (e) { errorBox.textContent = e.message; }
}

async function render() {
  const state = await api("state");
  app.replaceChildren(views[state.stage](state));
}

const views = {
  consent: () => h("div", {},
    h("h1", {}, document.title),
    h("p", {}, "You will see images from a dataset and the places where one feature of an image ",
      "model responds. You will be asked to point where it responds on new images, and to name ",
      "it. Your answers are stored with the ids your recruiting platform gave, and nothing else. ",
      "You may stop at any time."),
    h("label", {}, h("input", { type: "checkbox", id: "consent-agree" }),
      " I have read this and agree to take part."),
    h("div", {}, h("button", { id: "consent-continue", onclick: () => run(async () => {
      const agree = document.getElementById("consent-agree").checked;
      if (!agree) throw new Error("Please tick the box to agree, or close the page to leave.");
      await api("consent", { agree: true }); await render();
    }) }, "Continue"))),

  instructions: () => h("div", {},
    h("h1", {}, "Instructions"),
    h("p", {}, "Each trial shows a few example images. The highlighted regions are where one ",
      "feature of the model responds most."),
    h("ul", {},
      h("li", {}, "Point: click on a new image where you expect the feature to respond."),
      h("li", {}, "Name: write what the feature responds to in a few words, then pick the ",
        "image it responds to among several."),
      h("li", {}, "Some trials check your attention with a simple instruction: follow it.")),
    h("p", {}, "The first trials are practice and show you the answer afterwards."),
    h("button", { id: "start", onclick: () => run(async () => { await api("start", {}); await render(); }) },
      "Start")),

  trials: (state) => trialView(state),

  debrief: () => h("div", {},
    h("h1", {}, "Thank you"),
    h("p", {}, "The study measures how well people can tell where the features of an image model ",
      "respond and what they stand for; your answers are compared with where they really respond."),
    h("p", {}, "Any comments (optional):"),
    h("textarea", { id: "comments", rows: 4, cols: 60, maxlength: 2000 }),
    h("div", {}, h("button", { id: "finish", onclick: () => run(async () => {
      await api("finish", { comments: document.getElementById("comments").value }); await render();
    }) }, "Finish"))),

  done: (state) => h("div", {},
    h("h1", {}, "All done"),
    h("p", {}, "Your completion code:"),
    h("p", {}, h("span", { class: "code", id: "code" }, state.completion_code)),
    state.completion_url ? h("p", {}, h("a", { href: state.completion_url, id: "complete" },
      "Return to the recruiting platform")) : ""),
};

function trialView(state) {
  const t = state.trial;
  const head = h("div", {},
    h("p", { class: "progress" }, `Trial ${state.progress.done + 1} of ${state.progress.total} `,
      t.kind === "practice" ? h("span", { class: "tag" }, "practice") : ""),
    h("p", { id: "instruction" }, t.instruction));
  const refs = t.references ? h("div", { class: "refs" },
    t.references.map((src) => h("img", { src, alt: "example" }))) : "";
  const body = t.protocol === "localize" ? localizeView(t) : nameView(t);
  return h("div", { id: "trial", "data-position": t.position, "data-kind": t.kind }, head, refs, body);
}

function submit(t, answer) {
  return run(async () => {
    const out = await api(`trial/${t.position}`, answer);
    if (!out.feedback) return render();
    const fb = out.feedback;
    const panel = h("div", { id: "feedback" },
      fb.heatmap !== undefined
        ? [h("p", {}, `Score ${fb.score.toFixed(2)} (0 is chance, 1 is the feature's peak). `,
            "Here is where it really responds:"),
           h("img", { src: fb.heatmap, alt: "true response", width: 320 })]
        : h("p", {}, fb.right ? "Right: the feature responds to that image."
                              : "Not this one: the highlighted image is the right one."),
      h("div", {}, h("button", { id: "continue", onclick: () => run(render) }, "Continue")));
    if (fb.correct !== undefined) {
      document.querySelectorAll(".choice")[fb.correct].classList.add("right");
    }
    document.querySelectorAll("#submit, #clear").forEach((b) => { b.disabled = true; });
    app.append(panel);
  });
}

function localizeView(t) {
  const clicks = [];
  const marks = h("div", {});
  const img = h("img", { src: t.query, alt: "new image", id: "query-image", draggable: "false" });
  const box = h("div", { class: "query", id: "query" }, img, marks);
  const send = h("button", { id: "submit", disabled: true,
    onclick: () => submit(t, { clicks }) }, "Submit");
  const clear = h("button", { id: "clear", onclick: () => {
    clicks.length = 0; marks.replaceChildren(); send.disabled = true; } }, "Clear");
  box.addEventListener("click", (e) => {
    const r = img.getBoundingClientRect();
    const x = (e.clientX - r.left) / r.width, y = (e.clientY - r.top) / r.height;
    if (x < 0 || x >= 1 || y < 0 || y >= 1) return;
    if (clicks.length >= t.max_clicks) clicks.shift(), marks.firstChild.remove();
    clicks.push([x, y]);
    marks.append(h("div", { class: "mark", style: `left:${100 * x}%;top:${100 * y}%` }));
    send.disabled = false;
  });
  const hint = t.max_clicks > 1 ? ` (up to ${t.max_clicks} clicks)` : "";
  return h("div", {}, h("p", {}, `New image${hint}:`), box, h("div", {}, clear, send));
}

function nameView(t) {
  const name = h("input", { id: "name", type: "text", maxlength: t.max_name, size: 40,
    placeholder: "what it responds to" });
  const picks = { value: null };
  const send = h("button", { id: "submit", disabled: true,
    onclick: () => submit(t, { name: name.value, pick: picks.value }) }, "Submit");
  const choices = h("div", { class: "choices", hidden: true },
    t.choices.map((src, k) => h("img", { src, alt: `choice ${k + 1}`, class: "choice",
      "data-choice": k, onclick: (e) => {
        document.querySelectorAll(".choice").forEach((c) => c.classList.remove("picked"));
        e.target.classList.add("picked"); picks.value = k; send.disabled = false; } })));
  const pickStep = h("div", { hidden: true, id: "pick-step" },
    h("p", {}, "Which of these images does the feature respond to?"), choices, send);
  const next = h("button", { id: "name-next", onclick: () => {
    if (!name.value.trim()) { errorBox.textContent = "Please write a name first."; return; }
    errorBox.textContent = ""; name.readOnly = true; next.disabled = true;
    pickStep.hidden = false; choices.hidden = false; } }, "Next");
  return h("div", {}, h("p", {}, "Name the feature:"), name, next, pickStep);
}

run(render);
