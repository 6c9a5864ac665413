// Message templates: how many parameters they take and the text the customer will read.

const PLACEHOLDER = /\{\{\s*(\d{1,2})\s*\}\}/g;

/** How many positional parameters a text takes ({{1}}..{{n}}). */
export function paramCount(text) {
  let n = 0;
  for (const m of String(text || "").matchAll(PLACEHOLDER)) n = Math.max(n, Number(m[1]));
  return n;
}

/** A text with its placeholders filled; an empty value keeps its {{n}} so it shows. */
export function fill(text, values) {
  return String(text || "").replace(PLACEHOLDER, (whole, n) => {
    const v = values[Number(n) - 1];
    return v && v.trim() ? v : whole;
  });
}

/** The preview of a template with its parameters: header, body and footer. */
export function preview(template, params = [], headerParams = []) {
  if (!template) return "";
  return [template.header ? fill(template.header, headerParams) : null, fill(template.body, params), template.footer]
    .filter(Boolean)
    .join("\n\n");
}

/** Whether every parameter is filled (one line each, as WhatsApp requires). */
export function complete(template, params = [], headerParams = []) {
  if (!template) return false;
  const ok = (values, n) =>
    values.length >= n && values.slice(0, n).every((v) => v && v.trim() && !/[\n\t]/.test(v));
  return ok(params, template.parameters || 0) && ok(headerParams, template.header_parameters || 0);
}
