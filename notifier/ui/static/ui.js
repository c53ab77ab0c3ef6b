// notifier admin UI: small progressive enhancements; every page works as plain HTML forms too.
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // Forms that ask before they post (delete).
  $$("form[data-confirm]").forEach((form) => form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  }));

  // Header key/value rows.
  const rows = $("#header-rows");
  const addHeader = $("#add-header");
  if (rows && addHeader) {
    addHeader.addEventListener("click", () => {
      rows.appendChild($("#header-row-template").content.cloneNode(true));
      $$(".header-row", rows).pop().querySelector("input").focus();
    });
    rows.addEventListener("click", (event) => {
      const button = event.target.closest("[data-remove-row]");
      if (button) button.closest(".header-row").remove();
    });
  }

  // Customer identifier -> Source -> Card Number: each is usable only once the one before is set.
  const identifier = $("#customer-identifier");
  const source = $("#customer-source");
  const card = $("#card-number");
  function syncEnrichment() {
    source.disabled = !identifier.checked;
    if (!identifier.checked) source.value = "";
    card.disabled = !source.value;
    if (card.disabled) card.checked = false;
  }
  if (identifier && source && card) {
    identifier.addEventListener("change", syncEnrichment);
    source.addEventListener("change", syncEnrichment);
    syncEnrichment();
  }

  // Add events: the picker, its search box, the chips of what is selected.
  const picker = $("#event-picker");
  if (picker) {
    const search = $("#event-search");
    const items = $$(".event-item", picker);
    const chips = $("#selected-events");
    const count = $("#event-count");
    function renderChips() {
      const chosen = items.map((li) => li.querySelector("input[type=checkbox]")).filter((box) => box.checked);
      chips.replaceChildren(...chosen.map((box) => {
        const chip = document.createElement("span");
        chip.className = "chip";
        chip.textContent = box.value;
        return chip;
      }));
      count.textContent = chosen.length + " selected";
    }
    function filter() {
      const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      items.forEach((li) => { li.hidden = !words.every((w) => li.dataset.name.includes(w)); });
    }
    $("#select-events").addEventListener("click", () => { picker.hidden = false; search.focus(); });
    $("#events-done").addEventListener("click", () => { picker.hidden = true; });
    search.addEventListener("input", filter);
    search.addEventListener("keydown", (event) => { if (event.key === "Enter") event.preventDefault(); });
    picker.addEventListener("change", renderChips);
    picker.addEventListener("click", async (event) => {
      const button = event.target.closest("[data-schema]");
      if (!button) return;
      const pre = button.closest(".event-item").querySelector(".schema");
      const opening = pre.hidden;
      pre.hidden = !opening;
      button.setAttribute("aria-expanded", String(opening));
      if (opening && !pre.dataset.loaded) {
        pre.textContent = "Loading…";
        try {
          pre.textContent = JSON.stringify(await getJSON("/ui/schema/" + encodeURIComponent(button.dataset.schema)), null, 2);
          pre.dataset.loaded = "1";
        } catch (error) {
          pre.textContent = "Could not load the schema: " + error.message;
        }
      }
    });
    renderChips();
  }

  // Delivery log: a row's ">" shows its attempts.
  $$("[data-toggle-next]").forEach((button) => button.addEventListener("click", () => {
    const next = button.closest("tr").nextElementSibling;
    next.hidden = !next.hidden;
    button.setAttribute("aria-expanded", String(!next.hidden));
  }));

  // Event feed: original / enriched payload.
  $$("[data-payload]").forEach((box) => {
    const original = $("[data-original]", box);
    const enriched = $("[data-enriched]", box);
    const which = $("[data-delivery]", box);
    async function show(view) {
      $$("[data-view]", box).forEach((b) => b.classList.toggle("on", b.dataset.view === view));
      original.hidden = view !== "original";
      enriched.hidden = view !== "enriched";
      if (which) which.hidden = view !== "enriched" || which.options.length < 2;
      if (view === "enriched" && which) {
        enriched.textContent = "Loading…";
        try {
          const detail = await getJSON("/ui/deliveries/" + encodeURIComponent(which.value));
          enriched.textContent = JSON.stringify(detail.deliveredPayload, null, 2);
        } catch (error) {
          enriched.textContent = "Could not load the enriched payload: " + error.message;
        }
      }
    }
    $$("[data-view]", box).forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
    if (which) {
      which.hidden = true;
      which.addEventListener("change", () => show("enriched"));
    }
  });

  // Publish: choosing an event starts the data from a minimal valid example.
  const publishEvent = $("#publish-event");
  const publishData = $("#publish-data");
  if (publishEvent && publishData) {
    let example = publishData.value;
    publishEvent.addEventListener("change", async () => {
      if (!publishEvent.value || (publishData.value.trim() && publishData.value !== example)) return;
      try {
        example = JSON.stringify(await getJSON("/ui/example/" + encodeURIComponent(publishEvent.value)), null, 2);
        publishData.value = example;
      } catch (error) { /* keep what is there */ }
    });
  }
})();
