// The template picker: the account's approved templates, their parameters as inputs, and a
// preview of the message the customer will read. Offered beside the composer, and in its
// place once the 24-hour window has closed.

import { h } from "../dom.js";
import { complete, preview } from "../state/templates.js";

/** A picker inside `root` (a <dialog>); `load()` lists templates, `onSend(choice)` sends. */
export function createTemplatePicker(root, { load, onSend }) {
  const list = root.querySelector("#template-list");
  const form = root.querySelector("#template-form");
  const fields = root.querySelector("#template-fields");
  const out = root.querySelector("#template-preview");
  const send = root.querySelector("#template-send");
  const status = root.querySelector("#template-status");
  let templates = [];
  let chosen = null;

  function values(kind) {
    return [...fields.querySelectorAll(`input[data-kind="${kind}"]`)].map((i) => i.value);
  }

  function update() {
    const body = values("body");
    const header = values("header");
    out.textContent = preview(chosen, body, header);
    send.disabled = !complete(chosen, body, header);
  }

  function choose(template) {
    chosen = template;
    for (const b of list.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.key === key(template)));
    const inputs = [];
    for (let i = 1; i <= (template.header_parameters || 0); i++) inputs.push(field("header", i, `Header {{${i}}}`));
    for (let i = 1; i <= (template.parameters || 0); i++) inputs.push(field("body", i, `{{${i}}}`));
    fields.replaceChildren(...inputs);
    form.hidden = false;
    update();
    fields.querySelector("input")?.focus();
  }

  function field(kind, i, label) {
    const id = `tpl-${kind}-${i}`;
    return h(
      "label",
      { class: "tpl-field", for: id },
      h("span", {}, label),
      h("input", { id, type: "text", "data-kind": kind, dir: "auto", autocomplete: "off", oninput: update }),
    );
  }

  const key = (t) => `${t.name}/${t.language}`;

  async function open() {
    form.hidden = true;
    chosen = null;
    status.textContent = "Loading templates…";
    list.replaceChildren();
    if (!root.open) root.showModal();
    try {
      templates = await load();
    } catch (e) {
      status.textContent = "The templates could not be loaded.";
      return;
    }
    status.textContent = templates.length ? "" : "No approved templates in this WhatsApp Business Account.";
    list.replaceChildren(
      ...templates.map((t) =>
        h(
          "li",
          {},
          h(
            "button",
            { type: "button", class: "tpl-item", "data-key": key(t), "aria-pressed": "false", onclick: () => choose(t) },
            h("span", { class: "tpl-name" }, t.name),
            h("span", { class: "tpl-meta" }, `${t.language} · ${(t.category || "").toLowerCase()}`),
            h("span", { class: "tpl-body", dir: "auto" }, t.body),
          ),
        ),
      ),
    );
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!chosen || send.disabled) return;
    send.disabled = true;
    const ok = await onSend({
      name: chosen.name,
      language: chosen.language,
      parameters: values("body"),
      header_parameters: values("header"),
    });
    if (ok) root.close();
    else update();
  });
  root.addEventListener("click", (e) => {
    if (e.target === root || e.target.closest("[data-close]")) root.close();
  });

  return { open };
}
