// Keyboard layer of the comparison page. The page is a plain form that works without this file;
// here keys fill the same inputs: a/b side, 1-4 strength, u/i unsafe left/right, Enter submit,
// s skip, g guidelines. Keys typed into the note (or any text box) are left alone.
(function () {
  "use strict";
  const form = document.getElementById("judgment-form");
  if (!form) return;
  const started = performance.now();
  const timer = document.getElementById("timer");
  const status = document.getElementById("key-status");
  const guidelines = document.getElementById("guidelines");
  const sides = { a: "left", b: "right" };
  const unsafeKeys = { u: "left_unsafe", i: "right_unsafe" };
  let submitting = false;

  function elapsedSeconds() {
    return (performance.now() - started) / 1000;
  }

  function tick() {
    const s = Math.floor(elapsedSeconds());
    timer.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }
  tick();
  setInterval(tick, 1000);

  function say(text) {
    status.textContent = text;
  }

  function isTyping(el) {
    if (!el || el.isContentEditable) return !!el;
    const tag = el.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT") return true;
    return tag === "INPUT" && !["radio", "checkbox", "button", "submit", "hidden"].includes(el.type);
  }

  function checkRadio(name, value) {
    const input = form.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (input) input.checked = true;
    return input;
  }

  function chosen(name) {
    const input = form.querySelector('input[name="' + name + '"]:checked');
    return input ? input.value : null;
  }

  function submit() {
    if (!chosen("side")) { say("Choose a response first: a (left) or b (right)."); return; }
    if (chosen("strength") === null) { say("Say how much better: 1 to 4."); return; }
    form.requestSubmit(document.getElementById("submit-judgment"));
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    if (isTyping(event.target)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (key in sides) {
      checkRadio("side", sides[key]);
      say((key === "a" ? "A (left)" : "B (right)") + " is better.");
    } else if (["1", "2", "3", "4"].includes(key)) {
      const radio = checkRadio("strength", String(Number(key) - 1));
      if (radio) say("Strength: " + radio.parentElement.textContent.trim());
    } else if (key in unsafeKeys) {
      const box = form.elements[unsafeKeys[key]];
      box.checked = !box.checked;
      say((key === "u" ? "A (left)" : "B (right)") + (box.checked ? " marked unsafe." : " marked safe."));
    } else if (key === "Enter") {
      // A focused button or link keeps its own Enter (e.g. Skip).
      if (event.target.tagName === "BUTTON" || event.target.tagName === "A" || event.target.tagName === "SUMMARY") return;
      submit();
    } else if (key === "s") {
      document.getElementById("skip").click();
    } else if (key === "g") {
      if (guidelines && !guidelines.hidden) guidelines.open = !guidelines.open;
    } else {
      return;
    }
    event.preventDefault();
  });

  form.addEventListener("submit", function (event) {
    // One submission per page: a double press cannot send twice (the server is idempotent as well).
    if (submitting) { event.preventDefault(); return; }
    submitting = true;
    form.elements["seconds_spent"].value = elapsedSeconds().toFixed(1);
    say("Sending…");
  });
  // Coming back with the browser's back button shows the page from cache: allow submitting again.
  window.addEventListener("pageshow", function () { submitting = false; });
})();
