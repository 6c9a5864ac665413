import assert from "node:assert/strict";
import { test } from "node:test";

import { customerKey, fold, matchesCustomer, parse } from "../../static/js/search.js";
import { addResults, emptyResults, resultsUnavailable, updateConversation } from "../../static/js/state/results.js";

test("fold meets Arabic written any way, digits and accents as the server does", () => {
  assert.equal(fold("الفَاتُورَةِ"), "الفاتوره");
  assert.equal(fold("أحمد"), fold("احمد"));
  assert.equal(fold("إسلام"), fold("اسلام"));
  assert.equal(fold("مستشفى"), "مستشفي");
  assert.equal(fold("٥٥٢١ ۹"), "5521 9");
  assert.equal(fold("Café"), "cafe");
});

test("customers match by name word prefixes, the bare Arabic word, or any part of the number", () => {
  const key = customerKey("سارة العتيبي", "+966512345678");
  assert.ok(matchesCustomer(parse("ساره"), key));
  assert.ok(matchesCustomer(parse("سارَة"), key));
  assert.ok(matchesCustomer(parse("عتيبي"), key));
  assert.ok(matchesCustomer(parse("5678"), key));
  assert.ok(matchesCustomer(parse("0512 345 678"), key));
  assert.ok(!matchesCustomer(parse("ارة"), key));
  assert.ok(!matchesCustomer(parse("omar"), key));
  assert.ok(!matchesCustomer(parse("?!"), key));
  const en = customerKey("Sara Al-Harbi", "+966500000001");
  assert.ok(matchesCustomer(parse("al-harbi"), en));
  assert.ok(matchesCustomer(parse("SAR harb"), en));
});

test("results: pages add hits once each; unavailable empties them", () => {
  const hit = (id, cid = "c1") => ({ conversation: { id: cid, user_name: "A" }, message: { id }, snippet: [] });
  let s = emptyResults(" invoice ");
  assert.equal(s.q, "invoice");
  s = addResults(s, { messages: [hit("m1"), hit("m2")], next_cursor: "x", has_more: true });
  s = addResults(s, { messages: [hit("m2"), hit("m3")], next_cursor: null, has_more: false });
  assert.deepEqual(s.hits.map((h) => h.message.id), ["m1", "m2", "m3"]);
  assert.equal(s.hasMore, false);
  assert.ok(s.loaded);
  const renamed = updateConversation(s, { id: "c1", user_name: "B" });
  assert.ok(renamed.hits.every((h) => h.conversation.user_name === "B"));
  assert.equal(updateConversation(s, { id: "other" }), s);
  const off = resultsUnavailable(s);
  assert.ok(off.unavailable && off.hits.length === 0);
});
